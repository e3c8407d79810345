"""What the transformers back end prepares from a user's tasks before any evaluation: latency
prompts from the tasks' documents or a file, calibration text from each source, and the
settings errors (``task`` with ``tasks``, chat templates, calibration shorthands)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from evo_compress.config import CarbonConfig, HardwareConfig, ModelConfig
from evo_compress.exceptions import ConfigError, EvaluationError
from evo_compress.fitness import EvaluationContext, make_evaluator
from evo_compress.testing import save_random_llama
from evo_compress.testing.user_tasks import write_user_tasks

ADDITION = re.compile(r"^\d{3}\+\d{3}=$")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_random_llama(
        tmp_path_factory.mktemp("model"),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict:
    return write_user_tasks(tmp_path_factory.mktemp("tasks"))


def prepared(model: Path, folder: dict, **settings) -> dict:
    context = EvaluationContext(
        ModelConfig(id=str(model)), HardwareConfig(device="cpu"), CarbonConfig()
    )
    settings = {"task_include_path": str(folder["include_path"]), **settings}
    evaluator = make_evaluator("transformers", settings, context)
    evaluator.prepare()
    assert evaluator._task is not None
    return evaluator._task


def test_latency_prompts_are_the_tasks_documents_and_calibration_their_examples(model, tasks):
    data = prepared(
        model,
        tasks,
        tasks=[{"name": tasks["generate"], "weight": 2}, {"name": tasks["multiple_choice"]}],
    )
    assert [e["name"] for e in data["entries"]] == ["my_gen", "my_mc"]
    assert [e["weight"] for e in data["entries"]] == [2.0, 1.0]
    # doc_to_text of the test documents: the questions, nothing of the answers.
    test_questions = [
        json.loads(line)["question"]
        for line in (tasks["include_path"] / "data" / "gen_test.jsonl").read_text().splitlines()
    ]
    assert data["prompts"] and all(ADDITION.match(p) for p in data["prompts"])
    assert set(data["prompts"]) <= set(test_questions)
    # Calibration: my_gen's train documents and my_mc's validation documents (it has no
    # train split), each as lm-eval formats them: question, delimiter "", target text.
    texts = data["train_texts"]
    assert all(re.fullmatch(r"\d{3}\+\d{3}=\d{3}", t) for t in texts)
    assert all(int(t[:3]) + int(t[4:7]) == int(t[8:]) for t in texts[::2])  # my_gen's
    train = (tasks["include_path"] / "data" / "gen_train.jsonl").read_text().splitlines()
    assert texts[0] == "{question}{answer}".format(**json.loads(train[0]))
    sizes = tasks["sizes"]
    assert len(texts) == sizes["train"] + sizes["validation"]
    assert data["calibration_samples"] == 64


def test_prompts_are_cut_to_the_served_context(model, tasks, tmp_path):
    # The random model serves 64 tokens; with 60 new tokens a prompt keeps its last 4.
    long = tmp_path / "prompts.txt"
    long.write_text("1234567890+1234567890=\n\n12+34=\n")
    data = prepared(
        model, tasks, task=tasks["generate"], latency_prompt_file=str(long), max_new_tokens=60
    )
    assert data["prompts"] == ["890=", "+34="]
    with pytest.raises(ConfigError, match="max_new_tokens"):
        prepared(model, tasks, task=tasks["generate"], max_new_tokens=64)


def test_a_group_and_a_loglikelihood_task_give_prompts(model, tasks):
    data = prepared(model, tasks, task=tasks["group"])
    assert data["entries"] == [
        {
            "name": "my_group",
            "task": "my_group",
            "weight": 1.0,
            "limit": None,
            "num_fewshot": None,
            "metric": None,
            "apply_chat_template": False,
            "fewshot_as_multiturn": False,
        }
    ]
    assert data["prompts"] and all(ADDITION.match(p) for p in data["prompts"])
    # my_ll has no train or validation split: its group's calibration is my_mc's validation.
    assert len(data["train_texts"]) == tasks["sizes"]["validation"]


def test_calibration_from_a_text_file_and_a_jsonl_file(model, tasks, tmp_path):
    txt = tmp_path / "cal.txt"
    txt.write_text("12+34=46\n\n" + "111+222=333" * 100 + "\n")
    data = prepared(
        model,
        tasks,
        task=tasks["generate"],
        calibration={"source": "file", "path": str(txt), "max_tokens": 20},
    )
    assert data["train_texts"] == ["12+34=46", ("111+222=333" * 2)[:20]]
    # The shorthand says the same.
    short = prepared(
        model, tasks, task=tasks["generate"], calibration_file=str(txt), calibration_samples=1
    )
    assert short["train_texts"][0] == "12+34=46" and short["calibration_samples"] == 1

    jsonl = tmp_path / "cal.jsonl"
    jsonl.write_text('{"body": "1+1=2", "id": 1}\n{"body": "2+2=4", "id": 2}\n')
    data = prepared(
        model,
        tasks,
        task=tasks["generate"],
        calibration={"source": "file", "path": str(jsonl), "column": "body", "samples": 8},
    )
    assert data["train_texts"] == ["1+1=2", "2+2=4"] and data["calibration_samples"] == 8
    with pytest.raises(ConfigError, match=r"`evaluator.settings.calibration.column`.*'text'"):
        prepared(model, tasks, task=tasks["generate"], calibration_file=str(jsonl))
    with pytest.raises(ConfigError, match=r"`evaluator.settings.calibration.path`: cannot read"):
        prepared(model, tasks, task=tasks["generate"], calibration_file=str(tmp_path / "nope"))


def test_calibration_from_a_datasets_folder_on_disk(model, tasks, tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["7+8=15", "", "9+9=18"], "n": [1, 2, 3]}).save_to_disk(
        str(folder)
    )
    data = prepared(
        model, tasks, task=tasks["generate"], calibration={"source": "hf", "name": str(folder)}
    )
    assert data["train_texts"] == ["7+8=15", "9+9=18"]

    # A folder of data files, loaded by `datasets`' packaged builders.
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text('{"content": "5+5=10"}\n')
    data = prepared(
        model,
        tasks,
        task=tasks["generate"],
        calibration={"source": "hf", "name": str(files), "column": "content"},
    )
    assert data["train_texts"] == ["5+5=10"]


def test_an_unreachable_hub_data_set_is_one_line_naming_it(model, tasks, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # No network and nothing cached: fail at once, not after retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EvaluationError) as caught:
        prepared(
            model,
            tasks,
            task=tasks["generate"],
            calibration={"source": "hf", "name": "no-such-org/no-such-corpus"},
        )
    message = str(caught.value)
    assert "\n" not in message
    assert "`evaluator.settings.calibration.name`" in message
    assert "'no-such-org/no-such-corpus'" in message


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        (
            {"task": "my_gen", "tasks": [{"name": "my_mc"}]},
            "`evaluator.settings.task` and `evaluator.settings.tasks`",
        ),
        ({"tasks": [{"name": "my_mc"}, {"name": "my_mc"}]}, "'my_mc' more than once"),
        ({"tasks": [{"name": "my_mc", "weight": 0}]}, "`evaluator.settings.tasks.0.weight`"),
        ({"tasks": [{"name": "my_mc", "shots": 2}]}, "unknown key `evaluator.settings.tasks.0"),
        (
            {"calibration_file": "a.txt", "calibration": {"path": "b.txt"}},
            "`evaluator.settings.calibration_file` and `evaluator.settings.calibration`",
        ),
        (
            {"calibration_samples": 8, "calibration": {"samples": 16}},
            "`evaluator.settings.calibration_samples` and",
        ),
        ({"calibration": {"source": "hf"}}, "`evaluator.settings.calibration.name` is required"),
        ({"calibration": {"source": "web"}}, "`evaluator.settings.calibration.source`"),
    ],
)
def test_bad_task_and_calibration_settings_are_config_errors(model, settings, fragment):
    context = EvaluationContext(
        ModelConfig(id=str(model)), HardwareConfig(device="cpu"), CarbonConfig()
    )
    with pytest.raises(ConfigError) as caught:
        make_evaluator("transformers", settings, context)
    assert fragment in str(caught.value)


def test_a_chat_template_for_a_tokenizer_without_one_is_refused_before_evaluating(model, tasks):
    with pytest.raises(ConfigError, match=r"`evaluator.settings.tasks\[1\].apply_chat_template`"):
        prepared(
            model,
            tasks,
            tasks=[{"name": "my_gen"}, {"name": "my_mc", "apply_chat_template": True}],
        )


@pytest.mark.slow  # looking a name up among lm-eval's built-in tasks indexes them all (~30 s)
def test_an_unknown_task_is_a_config_error_at_prepare(model, tasks):
    with pytest.raises(ConfigError, match="no task `my_gsm`"):
        prepared(model, tasks, tasks=[{"name": "my_gen"}, {"name": "my_gsm"}])
