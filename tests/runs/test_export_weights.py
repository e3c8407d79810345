"""The compressed model as an output: `export --weights` rebuilds a run's recipe and
`compress` a recipe given by hand; the folder loads with transformers as the compressed model,
re-evaluating it reproduces the stored accuracy, and what cannot be saved is refused."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from evo_compress.exceptions import EvoCompressError
from evo_compress.fitness.model.environments import QUANT_ENV, QUANT_ENV_VAR, find_environment
from evo_compress.fitness.noise import N_KEY, STDERR_KEY
from evo_compress.genomes import SearchSpace
from evo_compress.runs.weights import PROVENANCE_FILE, WeightsOrigin, model_card, write_weights
from evo_compress.testing import assert_one_line_error, run_cli, run_search, save_random_llama

SETTINGS = {
    "threads": 1,
    "limit": 24,
    "latency_prompts": 2,
    "max_new_tokens": 2,
    "latency_repeats": 1,
    "calibration_samples": 16,
    "timeout_s": 600,
}
QLORA = {
    "quant": {"method": "nf4", "group_size": 32},
    "recovery": {"method": "qlora", "steps": 50},
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random Llama with the reference tokenizer (random weights: every code path runs)."""
    return save_random_llama(
        tmp_path_factory.mktemp("tiny-llama"),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def config_file(tmp_path: Path, model: str, **settings: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "weights",
                "model": {"id": model},
                "hardware": {"device": "cpu"},
                "evaluator": {"name": "transformers", "settings": {**SETTINGS, **settings}},
                "cache": {"enabled": False},
                "output": {"runs_root": str(tmp_path / "runs")},
            }
        )
    )
    return path


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n"), card[:80]
    head, _, _ = card[4:].partition("\n---\n")
    data = yaml.safe_load(head)
    assert isinstance(data, dict)
    return data


def origin() -> WeightsOrigin:
    recipe = SearchSpace.builtin().recipe({"quant": {"method": "int8_weight_only"}})
    return WeightsOrigin(recipe, "m", "folder:x", "transformers", {"seed": 0}, "cpu", "t")


# ---------------------------------------------------------------------- the folder
def test_a_failed_build_leaves_nothing_behind(tmp_path):
    out = tmp_path / "weights"

    def build(folder: Path) -> dict[str, Any]:
        (folder / "model.safetensors").write_bytes(b"half")
        raise EvoCompressError("boom")

    with pytest.raises(EvoCompressError, match="boom"):
        write_weights(out, origin(), build)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder either


def test_an_earlier_export_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "weights"

    def build(text: str) -> Any:
        def _build(folder: Path) -> dict[str, Any]:
            (folder / "model.safetensors").write_text(text)
            return {}

        return _build

    files = write_weights(out, origin(), build("first"))
    assert {p.name for p in files} >= {"model.safetensors", "README.md", PROVENANCE_FILE}
    with pytest.raises(EvoCompressError, match="--force"):
        write_weights(out, origin(), build("second"))
    assert (out / "model.safetensors").read_text() == "first"

    def failing(folder: Path) -> dict[str, Any]:
        raise EvoCompressError("boom")

    with pytest.raises(EvoCompressError):
        write_weights(out, origin(), failing, force=True)
    assert (out / "model.safetensors").read_text() == "first"  # kept on failure
    write_weights(out, origin(), build("second"), force=True)
    assert (out / "model.safetensors").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(EvoCompressError, match="no earlier weights export"):
        write_weights(other, origin(), build("x"), force=True)
    assert (other / "notes.txt").read_text() == "keep"


def test_the_model_card_shows_each_task_of_the_record():
    """Records with several tasks (`metadata.tasks`) get one row and one model-index result per
    task; the front matter is YAML that Hugging Face reads."""
    tasks = {
        "my_gen": {"score": 0.25, "stderr": 0.05, "n": 80, "metric": "exact_match", "weight": 2},
        "my_mc": {"score": 0.5, "stderr": 0.04, "n": 100, "metric": "acc", "weight": 1},
    }
    accuracy = {"value": 1 / 3, "stderr": 0.03, "n": 180, "direction": "max", "how": "lm-eval"}
    base = origin()
    card = model_card(
        WeightsOrigin(
            base.recipe,
            "org/base-model",
            "hub:org/base-model@main",
            "transformers",
            {"seed": 7, "threads": 2},
            "cpu",
            "my_gen",
            run={"name": "r", "dir": "/runs/r", "individual": 3, "generation": 1},
            objectives={"accuracy": accuracy},
            tasks=tasks,
        ),
        {"details": {"quant": {"method": "int8_weight_only", "library": "torchao 0.18"}}},
    )
    meta = front_matter(card)
    assert meta["base_model"] == "org/base-model"
    assert {"quantized", "int8_weight_only"} <= set(meta["tags"])
    results = meta["model-index"][0]["results"]
    assert [
        (r["dataset"]["name"], r["metrics"][0]["type"], r["metrics"][0]["value"]) for r in results
    ] == [
        ("my_gen", "exact_match", 0.25),
        ("my_mc", "acc", 0.5),
    ]
    assert "| my_gen | 0.25 | 0.05 | 80 | exact_match | 2 |" in card
    assert "| my_mc | 0.5 | 0.04 | 100 | acc | 1 |" in card
    assert "individual 3 (generation 1)" in card and "seed 7" in card


@pytest.mark.slow
def test_compress_refuses_qlora_before_loading(tmp_path, tiny_model):
    config = config_file(tmp_path, str(tiny_model))
    out = tmp_path / "out"
    proc = run_cli("compress", "-c", config, "-r", json.dumps(QLORA), "-o", out, check=False)
    assert_one_line_error(proc, "recovery.method=qlora", "cannot be saved")
    assert "loading" not in proc.stderr  # refused before the model was loaded
    assert not out.exists()


def test_export_weights_of_a_missing_damaged_or_synthetic_run_is_one_line(
    tmp_path, config_factory
):
    out = tmp_path / "out"
    proc = run_cli("export", tmp_path / "nope", 1, "--weights", out, check=False)
    assert_one_line_error(proc, "does not exist")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "run.sqlite").write_bytes(b"not a database at all" * 100)
    proc = run_cli("export", damaged, 1, "--weights", out, check=False)
    assert_one_line_error(proc, "run.sqlite", "not a readable SQLite run store")

    run_dir = run_search(
        config_factory(search={"population_size": 4, "generations": 1}), tmp_path / "run"
    )
    proc = run_cli("export", run_dir, 9999, "--weights", out, check=False)
    assert_one_line_error(proc, "9999")
    proc = run_cli("export", run_dir, 1, "--weights", out, "-o", tmp_path / "r", check=False)
    assert_one_line_error(proc, "`transformers` or `vllm` evaluator", "`synthetic`")
    assert not out.exists()

    # A run whose stored config was damaged: one line naming it.
    db = sqlite3.connect(run_dir / "run.sqlite")
    db.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps("[: broken"),))
    db.commit()
    db.close()
    proc = run_cli("export", run_dir, 1, "--weights", out, "-o", tmp_path / "r2", check=False)
    assert_one_line_error(proc)
    assert not out.exists()


# ---------------------------------------------------------------------- compress
@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "weight_class"),
    [
        # Pruned + int8 weights are saved and reloaded by the `export --weights` test below.
        pytest.param(
            {"quant": {"method": "gptq", "group_size": 32}},
            "IntxUnpackedToInt8Tensor",
            marks=pytest.mark.skipif(
                find_environment(QUANT_ENV, QUANT_ENV_VAR) is None,
                reason="gptq runs llm-compressor: `make vllm-env` makes .venv-quant",
            ),
        ),
        ({"quant": {"method": "nf4", "group_size": 32}}, "Params4bit"),
        ({"quant": {"method": "int8_bnb"}}, "Int8Params"),
        (
            {
                "prune": {"method": "structured_mlp", "sparsity": 0.5},
                "recovery": {"method": "lora", "lora_rank": 4, "steps": 50},
            },
            "Parameter",
        ),
    ],
    ids=["gptq", "nf4", "int8_bnb", "structured_mlp+lora"],
)
def test_compress_writes_a_folder_transformers_loads_as_the_compressed_model(
    tmp_path, tiny_model, recipe, weight_class
):
    import torch
    from transformers import AutoModelForCausalLM

    from evo_compress.config import ModelConfig
    from evo_compress.fitness.model import model_fingerprint

    config = config_file(tmp_path, str(tiny_model))
    out = tmp_path / "out"
    proc = run_cli("compress", "-c", config, "-r", json.dumps(recipe), "-o", out, "-f", "json")
    listed = json.loads(proc.stdout)["files"]
    assert "saving the compressed model" in proc.stderr  # progress on stderr, JSON on stdout
    assert {Path(p).name for p in listed} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        PROVENANCE_FILE,
    }
    model = AutoModelForCausalLM.from_pretrained(out)
    down = model.model.layers[0].mlp.down_proj
    assert type(down.weight).__name__ == weight_class
    assert type(model.lm_head.weight).__name__ == "Parameter"  # the head stays full precision
    if recipe.get("prune", {}).get("method") == "structured_mlp":
        assert model.config.intermediate_size == down.weight.shape[1] == 64
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()

    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["run"] is None and record["objectives"] is None
    assert record["recipe"] == SearchSpace.builtin().recipe(recipe).to_dict()
    assert record["reload_check"]["max_logit_difference"] == 0.0
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert "evo-compress" in meta["tags"]
    assert "Not measured" in card
    # The folder is a model of its own for the fitness cache: never the base model's entry.
    assert model_fingerprint(ModelConfig(id=str(out))) != model_fingerprint(
        ModelConfig(id=str(tiny_model))
    )

    again = run_cli("compress", "-c", config, "-r", json.dumps(recipe), "-o", out, check=False)
    assert_one_line_error(again, "--force")


# ---------------------------------------------------------------------- reproduce
def _combined_stderr(*values: float | None) -> float:
    assert all(v is not None for v in values), values
    return math.sqrt(sum(float(v) ** 2 for v in values if v is not None))


@pytest.mark.slow
def test_exported_weights_reproduce_the_stored_accuracy(tmp_path):
    """A real search on the reference model; two of its recipes (pruned + int8, pruned +
    LoRA) exported with --weights, then each folder evaluated as `model.id` with the baseline
    recipe: the accuracy must match the stored one within 2 combined standard errors."""
    from evo_compress.app import checked_config, make_config_evaluator
    from evo_compress.runs import RunStore

    recipes = [
        {
            "prune": {"method": "magnitude", "sparsity": 0.3},
            "quant": {"method": "int8_weight_only"},
            "serve": {"max_num_seqs": 4},
        },
        {
            "prune": {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"},
            "recovery": {"method": "lora", "lora_rank": 4, "steps": 50},
        },
        {"quant": {"method": "rtn", "group_size": 32}},
        {**QLORA, "recovery": {"method": "qlora", "lora_rank": 4, "steps": 50}},
    ]
    (tmp_path / "recipes.yaml").write_text(yaml.safe_dump(recipes))
    settings = {**SETTINGS, "limit": 60}
    data = {
        "name": "export-weights",
        "model": {"id": "reference"},
        "hardware": {"device": "cpu"},
        "search": {
            "population_size": 4,
            "generations": 1,
            "seed": 0,
            "recipes": str(tmp_path / "recipes.yaml"),
        },
        "evaluator": {"name": "transformers", "settings": settings},
        "cache": {"enabled": False},
        "output": {"runs_root": str(tmp_path / "runs")},
    }
    run_dir = run_search(checked_config(data), tmp_path / "run")
    space = SearchSpace.builtin()
    wanted = {space.recipe(r).hash: i for i, r in enumerate(recipes)}
    with RunStore.open(run_dir, read_only=True) as store:
        found = {}
        for row in store.individuals(generation=0):
            evaluation = store.evaluation(row.id)
            if row.hash in wanted and evaluation is not None:
                found[wanted[row.hash]] = (row.id, evaluation.result)
    assert set(found) == {0, 1, 2, 3}, found
    for _ident, result in found.values():
        assert result.ok, result.reason

    # qlora was measured, but its model cannot be one checkpoint: refused, nothing written.
    refused = tmp_path / "qlora"
    proc = run_cli("export", run_dir, found[3][0], "--weights", refused, check=False)
    assert_one_line_error(proc, "qlora")
    assert not refused.exists()

    fingerprints = set()
    for index in (0, 1, 2):
        ident, stored = found[index]
        out = tmp_path / f"weights-{index}"
        proc = run_cli("export", run_dir, ident, "--weights", out, "-o", tmp_path / f"r{index}")
        assert (out / "model.safetensors").is_file(), proc.stdout + proc.stderr
        card = (out / "README.md").read_text()
        meta = front_matter(card)
        accuracy = stored.objectives["accuracy"]
        # The trained model scores well above chance: an equal 0 == 0 would prove nothing.
        assert accuracy > 0.2, (index, accuracy)
        (result,) = meta["model-index"][0]["results"]
        assert result["metrics"][0]["value"] == pytest.approx(accuracy)
        assert f"individual {ident}" in card and "search seed 0" in card
        record = json.loads((out / PROVENANCE_FILE).read_text())
        assert record["run"]["individual"] == ident and record["seed"] == 0
        assert record["warnings"] == []  # same machine and settings as the run

        config = checked_config({**data, "model": {"id": str(out)}})
        evaluator = make_config_evaluator(config)
        fingerprints.add(evaluator.fingerprint())
        again = evaluator.evaluate(space.recipe({}), space)
        evaluator.close()
        assert again.ok, again.reason
        assert again.objectives is not None and stored.objectives is not None
        drift = abs(again.objectives["accuracy"] - accuracy)
        noise = _combined_stderr(stored.metadata[STDERR_KEY], again.metadata[STDERR_KEY])
        print(
            f"recipe {index}: stored {accuracy:.4f} ± {stored.metadata[STDERR_KEY]:.4f}, "
            f"exported {again.objectives['accuracy']:.4f} ± {again.metadata[STDERR_KEY]:.4f} "
            f"(n={again.metadata[N_KEY]})"
        )
        assert drift <= 2 * noise, (index, accuracy, again.objectives["accuracy"], noise)
        weights = again.metadata["compression"]["quant"]["weight_bytes"]
        stored_weights = stored.metadata["compression"]["quant"]["weight_bytes"]
        assert weights == stored_weights  # the same tensors, not a dequantized copy
    assert len(fingerprints) == 3  # each folder is its own model for the fitness cache


@pytest.mark.slow
def test_compress_on_the_vllm_back_end_writes_the_checkpoint_it_serves(tmp_path, tiny_model):
    """The vLLM back end's weights are its served checkpoint (here a 2:4-pruned dense one,
    built as an evaluation builds it), with the card and record of any export."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    config = tmp_path / "vllm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "weights-vllm",
                "model": {"id": str(tiny_model)},
                "hardware": {"device": "cpu"},
                "evaluator": {
                    "name": "vllm",
                    "settings": {
                        "command": [sys.executable, "-m", "evo_compress_doubles.vllm_server"],
                        "vllm_version": "0.32.0",
                        "threads": 1,
                        "checkpoint_dir": str(tmp_path / "ckpt"),
                        "calibration_samples": 16,
                    },
                },
                "output": {"runs_root": str(tmp_path / "runs")},
            }
        )
    )
    recipe = {"prune": {"method": "magnitude", "pattern": "2:4"}}
    out = tmp_path / "out"
    run_cli("compress", "-c", config, "-r", json.dumps(recipe), "-o", out)
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["evaluator"] == "vllm" and record["recipe"]["prune"]["method"] == "magnitude"
    assert record["compression"]["format"] == "dense safetensors"
    assert not (out / "evo_checkpoint.json").exists()  # the cache's own marker stays behind
    assert "evo-compress" in front_matter((out / "README.md").read_text())["tags"]
    model = AutoModelForCausalLM.from_pretrained(out)
    down = model.model.layers[0].mlp.down_proj.weight
    assert float((down == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
    # A recipe the back end cannot serve is one line, and nothing is written.
    bad = run_cli(
        "compress",
        "-c",
        config,
        "-r",
        '{"quant": {"method": "awq"}}',
        "-o",
        tmp_path / "x",
        check=False,
    )
    assert_one_line_error(bad)
    assert not (tmp_path / "x").exists()
