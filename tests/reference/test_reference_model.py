"""The reference tokenizer, addition task and trained model, and lm-eval accuracy on them.

The model is trained once per machine into the project's default cache folder (CI trains it
once per run). Tests that need it are marked ``slow`` only while it is not cached yet: that
is when they cost a training run (about two minutes on two cores).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

# No network here: never let transformers, datasets or lm-eval try the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from evo_compress.exceptions import EvaluationError  # noqa: E402
from evo_compress.fitness.hf.accuracy import measure_accuracy  # noqa: E402
from evo_compress.fitness.model.tasks import task_manager  # noqa: E402
from evo_compress.reference import (  # noqa: E402
    MIN_ACCURACY,
    TaskSpec,
    build_tokenizer,
    default_cache_dir,
    ensure_reference_model,
    ensure_reference_task,
    make_splits,
    read_reference_info,
    reference_model_dir,
)
from evo_compress.reference.model import REQUIRED_FILES, is_complete  # noqa: E402
from evo_compress.reference.task import iter_problems  # noqa: E402

CACHE = default_cache_dir()
needs_model = (
    pytest.mark.usefixtures("reference_dir")
    if is_complete(reference_model_dir(CACHE))
    else pytest.mark.slow
)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return ensure_reference_model(CACHE, progress=False)


@pytest.fixture(scope="session")
def task() -> TaskSpec:
    return ensure_reference_task(CACHE)


@pytest.fixture(scope="session")
def loaded(reference_dir: Path) -> tuple[Any, Any]:
    model = transformers.AutoModelForCausalLM.from_pretrained(reference_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(reference_dir)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def base_accuracy(loaded: tuple[Any, Any], task: TaskSpec) -> dict[str, Any]:
    model, tokenizer = loaded
    return measure_accuracy(model, tokenizer, task)


# ---------------------------------------------------------------- tokenizer and task


@pytest.mark.parametrize("text", ["12+34=", "999+999=1998\n", "0+0=0\n", "1+2=3\n7+8=15\n"])
def test_tokenizer_round_trips_one_token_per_character(text: str, tmp_path: Path) -> None:
    build_tokenizer().save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # no BOS/EOS added, nothing merged
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(ids) == list(text)
    assert tokenizer.unk_token_id not in ids


def test_tokenizer_maps_foreign_characters_to_unk() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("1 a")["input_ids"]
    assert ids[1:] == [tokenizer.unk_token_id] * 2


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EVO_COMPRESS_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("EVO_COMPRESS_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "evo-compress")
    assert (default_cache_dir().parent.parent / "pyproject.toml").is_file()  # the checkout


def test_task_files_are_deterministic(tmp_path: Path) -> None:
    first = ensure_reference_task(tmp_path / "a")
    second = ensure_reference_task(tmp_path / "b")
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        data = (first.include_path / name).read_bytes()
        assert data == (second.include_path / name).read_bytes()
    yaml_a = (first.include_path / "evo_addition.yaml").read_text()
    yaml_b = (second.include_path / "evo_addition.yaml").read_text()
    assert yaml_a.replace(str(tmp_path / "a"), "") == yaml_b.replace(str(tmp_path / "b"), "")
    assert (first.name, first.train_texts, first.prompts) == (
        second.name,
        second.train_texts,
        second.prompts,
    )
    mtime = (first.include_path / "train.jsonl").stat().st_mtime_ns
    assert ensure_reference_task(tmp_path / "a") == first
    assert (first.include_path / "train.jsonl").stat().st_mtime_ns == mtime  # not rewritten


def test_task_splits_are_disjoint_and_exact(tmp_path: Path) -> None:
    spec = ensure_reference_task(tmp_path)
    splits = {
        name: list(iter_problems(spec.include_path / f"{name}.jsonl"))
        for name in ("train", "validation", "test")
    }
    keys = {
        name: {(min(p.a, p.b), max(p.a, p.b)) for p in problems}
        for name, problems in splits.items()
    }
    for name, problems in splits.items():
        assert len(keys[name]) == len(problems), f"{name} repeats a problem"
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    assert 200 <= len(splits["test"]) <= 300
    assert spec.train_texts == tuple(f"{p.a}+{p.b}={p.a + p.b}\n" for p in splits["train"])
    assert len(spec.prompts) == 32 and all(p.endswith("=") for p in spec.prompts)
    test_questions = {p.question for p in splits["test"]}
    assert not test_questions & set(spec.prompts)
    # A different seed draws different problems.
    assert make_splits(seed=99, sizes=(10, 10, 10)).test != make_splits(sizes=(10, 10, 10)).test


# ---------------------------------------------------------------- the trained model


@needs_model
def test_reference_folder_loads_with_auto_classes(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == model.config.num_attention_heads
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    assert tokenizer.decode(tokenizer("123+45=")["input_ids"]) == "123+45="
    enc = tokenizer(["123+45=", "7+8="], return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    # The newline is a stop token of the saved generation config.
    assert all(a.endswith("\n") or len(a) == 6 for a in answers)


@needs_model
def test_reference_json_records_training(reference_dir: Path) -> None:
    info = read_reference_info(reference_dir)
    assert info["test_accuracy"] >= MIN_ACCURACY
    assert info["validation_accuracy"] >= MIN_ACCURACY
    assert info["test_n"] >= 200
    assert info["training"]["steps"] > 0 and info["threads"] == info["training"]["threads"]
    # Seeds are tried in order and the recorded one is the last attempt.
    seeds = [a["seed"] for a in info["attempts"]]
    assert seeds == list(range(info["training"]["seed"], info["training"]["seed"] + len(seeds)))
    assert info["seed"] == seeds[-1]
    assert info["wall_seconds"] > 0
    assert {"torch", "transformers", "tokenizers"} <= set(info["versions"])
    for name in REQUIRED_FILES:
        assert (reference_dir / name).is_file()


@needs_model
def test_ensure_reference_model_is_cached(reference_dir: Path) -> None:
    before = (reference_dir / "reference.json").read_bytes()
    start = time.perf_counter()
    assert ensure_reference_model(CACHE, progress=False) == reference_dir
    assert time.perf_counter() - start < 2.0
    assert (reference_dir / "reference.json").read_bytes() == before


@needs_model
def test_incomplete_folder_is_not_complete(reference_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(reference_dir, copy)
    assert is_complete(copy)
    (copy / "model.safetensors").unlink()
    assert not is_complete(copy)
    shutil.copytree(reference_dir, copy, dirs_exist_ok=True)
    info = json.loads((copy / "reference.json").read_text())
    (copy / "reference.json").write_text(json.dumps({**info, "model_version": -1}))
    assert not is_complete(copy)


@needs_model
def test_lm_eval_accuracy_matches_training_record(
    reference_dir: Path, base_accuracy: dict[str, Any]
) -> None:
    recorded = read_reference_info(reference_dir)["test_accuracy"]
    assert base_accuracy["task"] == "evo_addition"
    assert base_accuracy["metric"] == "exact_match"
    assert base_accuracy["n"] == read_reference_info(reference_dir)["test_n"]
    assert base_accuracy["accuracy"] >= MIN_ACCURACY
    # Same greedy decoding; batching may flip a rare near-tie, never more than 2 of 250.
    assert base_accuracy["accuracy"] == pytest.approx(recorded, abs=0.01)
    assert 0 < base_accuracy["stderr"] < 0.05
    assert base_accuracy["seconds"] < 60


@needs_model
def test_measure_accuracy_by_name_with_limit(
    loaded: tuple[Any, Any], task: TaskSpec, base_accuracy: dict[str, Any]
) -> None:
    model, tokenizer = loaded
    result = measure_accuracy(
        model, tokenizer, task.name, include_path=task.include_path, limit=40
    )
    assert result["n"] == 40
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] >= MIN_ACCURACY - 0.1


@needs_model
def test_damaged_model_scores_lower(
    reference_dir: Path, task: TaskSpec, base_accuracy: dict[str, Any]
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(reference_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                weight = linear.weight
                weight[: weight.shape[0] // 2] = 0  # half of every MLP weight
    damaged = measure_accuracy(model, tokenizer, task)
    assert damaged["accuracy"] < base_accuracy["accuracy"] - 0.3


def test_unknown_task_is_an_evaluation_error(tmp_path: Path) -> None:
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=17,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    spec = ensure_reference_task(tmp_path)
    with pytest.raises(EvaluationError, match="no task `no_such_task`"):
        measure_accuracy(model, build_tokenizer(), "no_such_task", include_path=spec.include_path)
    # The fallback it searched is lm-eval's own index plus ours: real task names are known.
    manager = task_manager(spec.include_path, with_defaults=True)
    assert {"gsm8k", "evo_addition"} <= set(manager.all_tasks)


@pytest.mark.slow  # a minute: two steps, then the accuracy of the held-out splits
@pytest.mark.filterwarnings("ignore:the reference model reached only")
def test_training_with_progress_shows_only_its_own_bar(tmp_path, task, capfd):
    from evo_compress.reference.model import TrainingSettings, train_reference_model

    settings = TrainingSettings(steps=2, warmup_steps=1, batch_size=8, attempts=1)
    train_reference_model(tmp_path / "model", task, settings, progress=True)
    err = capfd.readouterr().err
    # transformers' own "Writing model shards" bar stays off; its switch is restored.
    assert "Writing model shards" not in err and "it/s]" not in err, err
    assert transformers.utils.logging.is_progress_bar_enabled()
