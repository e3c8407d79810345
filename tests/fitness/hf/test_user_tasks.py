"""A user's own model folder and lm-eval tasks on the transformers back end, evaluated end to
end (issue 18's reproduction): several tasks of different output types scored in one
evaluation, a group, and racing over a task list."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
from evo_compress.exceptions import ConfigError
from evo_compress.fitness import EvaluationContext, make_evaluator
from evo_compress.fitness.racing import RaceMember, RaceRule
from evo_compress.genomes import SearchSpace
from evo_compress.testing import invoke_cli, save_random_llama
from evo_compress.testing.user_tasks import write_user_tasks

SPACE = SearchSpace.builtin()
FAST = {"threads": 1, "latency_prompts": 2, "max_new_tokens": 2, "latency_repeats": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    return write_user_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_random_llama(
        tmp_path_factory.mktemp("tiny"),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )


def evaluate_cli(tmp_path: Path, model: Path, settings: dict) -> dict:
    config = {
        "name": "user-tasks",
        "model": {"id": str(model)},
        "hardware": {"device": "cpu"},
        "evaluator": {"name": "transformers", "settings": {**FAST, **settings}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = invoke_cli(
        "evaluate", "--config", path, "--recipe", "{}", "--no-cache", "--format", "json"
    )
    assert code == 0, (out, err)
    return dict(json.loads(out))


def test_a_users_model_folder_and_two_tasks_of_different_types_evaluate(tmp_path, folder):
    from evo_compress.reference import default_cache_dir, ensure_reference_model

    model = tmp_path / "mymodel"
    shutil.copytree(ensure_reference_model(default_cache_dir(), progress=False), model)
    include = str(folder["include_path"])

    # The reproduction: one user task (here the multiple-choice one) with `task`.
    single = evaluate_cli(
        tmp_path, model, {"task": "my_mc", "task_include_path": include, "limit": 12}
    )
    assert single["status"] == "ok", single["reason"]
    [(name, scored)] = single["metadata"]["tasks"].items()
    assert name == "my_mc" and scored["metric"] == "acc" and scored["n"] == 12
    assert scored["weight"] == 1.0
    assert single["objectives"]["accuracy"] == scored["score"]

    both = evaluate_cli(
        tmp_path,
        model,
        {
            "tasks": [
                {"name": "my_gen", "weight": 2},
                {"name": "my_mc", "weight": 1, "limit": 10, "num_fewshot": 0},
            ],
            "task_include_path": include,
            "limit": 16,
        },
    )
    assert both["status"] == "ok", both["reason"]
    meta = both["metadata"]
    tasks = meta["tasks"]
    assert set(tasks) == {"my_gen", "my_mc"}
    assert (tasks["my_gen"]["metric"], tasks["my_gen"]["n"]) == ("exact_match", 16)
    assert (tasks["my_mc"]["metric"], tasks["my_mc"]["n"]) == ("acc", 10)
    # The trained model adds well: neither score is a constant of a broken pipeline.
    assert tasks["my_gen"]["score"] > 0.5 and tasks["my_mc"]["score"] > 0.25
    mean = (2 * tasks["my_gen"]["score"] + tasks["my_mc"]["score"]) / 3
    assert both["objectives"]["accuracy"] == pytest.approx(mean, rel=1e-12)
    stderr = math.sqrt(
        (2 / 3) ** 2 * tasks["my_gen"]["stderr"] ** 2
        + (1 / 3) ** 2 * tasks["my_mc"]["stderr"] ** 2
    )
    assert meta["accuracy_stderr"] == pytest.approx(stderr, rel=1e-12)
    assert meta["accuracy_n"] == 26
    assert meta["objectives"]["accuracy"]["how"].startswith("lm-eval weighted mean")
    assert both["objectives"]["latency"] > 0


def evaluator_for(model: Path, folder: dict, **settings):
    context = EvaluationContext(
        ModelConfig(id=str(model)), HardwareConfig(device="cpu"), CarbonConfig()
    )
    settings = {**FAST, "task_include_path": str(folder["include_path"]), **settings}
    return make_evaluator("transformers", settings, context)


def test_a_group_is_one_task_scored_by_its_aggregate_even_beside_its_member(tiny, folder):
    # my_mc is listed alone and inside my_group: lm-eval refuses one call with the same
    # task twice, so they are scored in two.
    tasks = [{"name": "my_group"}, {"name": "my_mc", "limit": 4, "weight": 3}]
    evaluator = evaluator_for(tiny, folder, tasks=tasks, limit=6)
    result = evaluator.evaluate(SPACE.recipe({}), SPACE)
    assert result.ok and result.objectives, result.reason
    scored = result.metadata["tasks"]
    assert set(scored) == {"my_group", "my_mc"}
    group = scored["my_group"]
    assert group["metric"] == "acc" and group["weight"] == 1.0
    assert group["n"] == 12  # 6 documents of each of its two tasks
    assert scored["my_mc"]["n"] == 4
    mean = (group["score"] + 3 * scored["my_mc"]["score"]) / 4
    assert result.objectives["accuracy"] == pytest.approx(mean, rel=1e-12)


def test_racing_over_two_tasks_scores_quick_items_per_task_then_the_rest(tiny, folder):
    tasks = [{"name": "my_gen", "weight": 3}, {"name": "my_mc", "limit": 9}]
    evaluator = evaluator_for(tiny, folder, tasks=tasks, limit=12)
    recipe = SPACE.recipe({})
    plain = evaluator.evaluate(recipe, SPACE)
    assert plain.ok and plain.objectives, plain.reason

    # Nothing on the front: 4 items of each task, then the rest of each, combined.
    full = evaluator.evaluate(recipe, SPACE, race=RaceRule(4, 2.0))
    assert full.ok and full.objectives, full.reason
    assert full.metadata["stage"] == "full"
    assert full.metadata["accuracy_run"]["racing"] == {
        "my_gen": {"quick_n": 4, "rest_n": 8},
        "my_mc": {"quick_n": 4, "rest_n": 5},
    }
    for name in ("my_gen", "my_mc"):
        assert full.metadata["tasks"][name]["n"] == plain.metadata["tasks"][name]["n"]
        assert full.metadata["tasks"][name]["score"] == pytest.approx(
            plain.metadata["tasks"][name]["score"], abs=1e-12
        )
    assert full.objectives["accuracy"] == pytest.approx(plain.objectives["accuracy"], abs=1e-12)
    assert full.metadata["accuracy_n"] == plain.metadata["accuracy_n"] == 21

    # A front member better than anything: the recipe stops after 4 items of each task.
    best = RaceMember((-1.0, 0.0, 0.0, 0.0, 0.0), 0.0)
    quick = evaluator.evaluate(recipe, SPACE, race=RaceRule(4, 0.0, (best,)))
    assert quick.ok, quick.reason
    assert quick.metadata["stage"] == "quick"
    assert {k: v["n"] for k, v in quick.metadata["tasks"].items()} == {"my_gen": 4, "my_mc": 4}
    assert quick.metadata["accuracy_n"] == 8


def test_a_task_with_the_chat_template_is_scored_beside_one_without(tmp_path, folder):
    from transformers import AutoTokenizer

    model = save_random_llama(
        tmp_path / "chat",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(model)
    tasks = [{"name": "my_gen", "limit": 4}, {"name": "my_mc", "apply_chat_template": True}]
    evaluator = evaluator_for(model, folder, tasks=tasks, limit=6)
    result = evaluator.evaluate(SPACE.recipe({}), SPACE)
    assert result.ok, result.reason
    assert {k: v["n"] for k, v in result.metadata["tasks"].items()} == {"my_gen": 4, "my_mc": 6}


def test_a_code_task_runs_only_with_allow_code_execution(tiny, folder, tmp_path):
    # A task marked `unsafe_code` (as lm-eval marks humaneval and mbpp) is refused before any
    # evaluation unless `allow_code_execution` confirms it to lm-eval.
    include = tmp_path / "code"
    include.mkdir()
    text = (folder["include_path"] / "my_gen.yaml").read_text()
    (include / "my_code.yaml").write_text(
        text.replace("task: my_gen", "task: my_code") + "unsafe_code: true\n"
    )
    refused = evaluator_for(tiny, {"include_path": include}, task="my_code", limit=2)
    with pytest.raises(ConfigError, match=r"`evaluator.settings.allow_code_execution`: task"):
        refused.prepare()
    allowed = evaluator_for(
        tiny, {"include_path": include}, task="my_code", limit=2, allow_code_execution=True
    )
    result = allowed.evaluate(SPACE.recipe({}), SPACE)
    assert result.ok, result.reason
    assert result.metadata["tasks"]["my_code"]["n"] == 2
