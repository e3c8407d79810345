"""lm-eval task folders written the way users write them: YAMLs over local JSONL files,
loaded through the ``json`` builder, with no help from evo-compress.

The documents are additions (``123+456=``), the only text the reference model's character
tokenizer can spell (digits, ``+``, ``=`` and the newline), so the trained reference model
scores well on them and a random model scores near chance. Four output shapes are written:
``generate_until`` with ``exact_match`` (shaped like GSM8K), ``multiple_choice`` with ``acc``
(shaped like ARC or MMLU), ``loglikelihood`` with ``acc``, and a group over the last two.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from evo_compress.reference.task import Problem, make_splits

GENERATE = "my_gen"
MULTIPLE_CHOICE = "my_mc"
LOGLIKELIHOOD = "my_ll"
GROUP = "my_group"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _choices(problem: Problem, rng: random.Random) -> tuple[list[str], int]:
    """The right sum and three wrong ones of the same width, in a seeded order."""
    right = problem.a + problem.b
    wrong: set[int] = set()
    while len(wrong) < 3:
        candidate = right + rng.choice((-11, -10, -2, -1, 1, 2, 10, 11))
        if 100 <= candidate <= 999 and candidate != right:
            wrong.add(candidate)
    choices = [str(right), *(str(w) for w in sorted(wrong))]
    rng.shuffle(choices)
    return choices, choices.index(str(right))


def write_user_tasks(
    folder: Path, n_train: int = 64, n_validation: int = 24, n_test: int = 40
) -> dict[str, Any]:
    """Write the task folder under ``folder`` and return ``include_path`` and the task names
    by shape (``generate``, ``multiple_choice``, ``loglikelihood``, ``group``) plus the
    sizes of the splits. ``my_gen`` has train, validation and test splits; ``my_mc`` only
    validation and test (its calibration text falls back to validation); ``my_ll`` only test.
    """
    folder = Path(folder).resolve()
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    splits = make_splits(seed=4321, sizes=(n_train, n_validation, n_test))
    rng = random.Random(0)

    def gen_rows(problems: tuple[Problem, ...]) -> list[dict[str, Any]]:
        return [{"question": p.question, "answer": p.answer} for p in problems]

    def mc_rows(problems: tuple[Problem, ...]) -> list[dict[str, Any]]:
        rows = []
        for p in problems:
            choices, label = _choices(p, rng)
            rows.append({"query": p.question, "choices": choices, "label": label})
        return rows

    for split in ("train", "validation", "test"):
        _write_jsonl(data / f"gen_{split}.jsonl", gen_rows(getattr(splits, split)))
    for split in ("validation", "test"):
        _write_jsonl(data / f"mc_{split}.jsonl", mc_rows(getattr(splits, split)))
    _write_jsonl(data / "ll_test.jsonl", gen_rows(splits.test))

    (folder / "my_gen.yaml").write_text(
        f"""\
task: {GENERATE}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data / "gen_train.jsonl"}
    validation: {data / "gen_validation.jsonl"}
    test: {data / "gen_test.jsonl"}
output_type: generate_until
training_split: train
validation_split: validation
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    )
    (folder / "my_mc.yaml").write_text(
        f"""\
task: {MULTIPLE_CHOICE}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data / "mc_validation.jsonl"}
    test: {data / "mc_test.jsonl"}
output_type: multiple_choice
validation_split: validation
test_split: test
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    )
    (folder / "my_ll.yaml").write_text(
        f"""\
task: {LOGLIKELIHOOD}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data / "ll_test.jsonl"}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    )
    (folder / "my_group.yaml").write_text(
        f"""\
group: {GROUP}
task:
  - {MULTIPLE_CHOICE}
  - {LOGLIKELIHOOD}
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
metadata:
  version: 1.0
"""
    )
    return {
        "include_path": folder,
        "generate": GENERATE,
        "multiple_choice": MULTIPLE_CHOICE,
        "loglikelihood": LOGLIKELIHOOD,
        "group": GROUP,
        "sizes": {"train": n_train, "validation": n_validation, "test": n_test},
    }


__all__ = ["GENERATE", "GROUP", "LOGLIKELIHOOD", "MULTIPLE_CHOICE", "write_user_tasks"]
