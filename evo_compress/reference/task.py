"""The reference task: 3-digit addition with exact answers, as a local lm-eval task.

``"123+456="`` -> ``"579"``; every text the model sees is ``question + answer + "\\n"``. Both
operands have exactly ``DIGITS`` digits and so does their sum: with every digit at a fixed
offset from ``+`` and ``=``, a ~1M-parameter Llama learns carries (in plain digit order) within
the two-minute training budget; with free lengths it often does not. The problems are drawn
from a seed, the train / validation / test splits are disjoint (also up to swapping the
operands, so ``456+123=`` never leaks a test answer), and the files are written byte for byte
the same for the same seed. The lm-eval YAML loads the JSONL files through the packaged
``json`` builder, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TASK_NAME = "evo_addition"
TASK_VERSION = 1
DIGITS = 3  # operands and sums have exactly this many digits
TASK_SEED = 1234
TRAIN_SIZE = 60_000
VALIDATION_SIZE = 250
TEST_SIZE = 250
N_PROMPTS = 32
TERMINATOR = "\n"
MAX_GEN_TOKS = DIGITS + 2  # the answer, the terminator and one token of slack


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def text(self) -> str:
        """What the model is trained on: question, answer, terminator."""
        return self.question + self.answer + TERMINATOR


@dataclass(frozen=True)
class AdditionSplits:
    train: tuple[Problem, ...]
    validation: tuple[Problem, ...]
    test: tuple[Problem, ...]


@dataclass(frozen=True)
class TaskSpec:
    """The reference task as the rest of evo-compress uses it.

    ``name`` and ``include_path`` are what lm-eval needs
    (``TaskManager(include_path=...)``, then the task ``name``); ``train_texts`` are whole
    ``question+answer+terminator`` strings for recovery training and calibration; ``prompts``
    are a fixed set of questions for latency measurement.
    """

    name: str
    include_path: Path
    train_texts: tuple[str, ...]
    prompts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("`name` must not be empty")
        if not self.train_texts or not self.prompts:
            raise ValueError("`train_texts` and `prompts` must not be empty")


def make_splits(
    seed: int = TASK_SEED,
    digits: int = DIGITS,
    sizes: tuple[int, int, int] = (TRAIN_SIZE, VALIDATION_SIZE, TEST_SIZE),
) -> AdditionSplits:
    """Draw disjoint problems ``a+b`` with ``a``, ``b`` and ``a+b`` all of ``digits``
    digits, uniformly among those. Test and validation are drawn first, so their problems do
    not depend on the train size."""
    if digits < 2:
        raise ValueError(f"`digits` must be >= 2, got {digits}")
    low, limit = 10 ** (digits - 1), 10**digits
    span = limit - 2 * low  # values of `a` that leave room for a `b`
    n_unordered = span * (span + 1) // 4
    if sum(sizes) > n_unordered // 2:
        raise ValueError(f"{sum(sizes)} problems is too many for {digits}-digit addition")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()

    def draw(n: int) -> tuple[Problem, ...]:
        out: list[Problem] = []
        while len(out) < n:
            a, b = rng.randrange(low, limit), rng.randrange(low, limit)
            key = (min(a, b), max(a, b))
            if a + b < limit and key not in seen:
                seen.add(key)
                out.append(Problem(a, b))
        return tuple(out)

    n_train, n_validation, n_test = sizes
    test = draw(n_test)
    validation = draw(n_validation)
    train = draw(n_train)
    return AdditionSplits(train=train, validation=validation, test=test)


def _jsonl(problems: tuple[Problem, ...]) -> str:
    lines = (
        json.dumps({"question": p.question, "answer": p.answer}, separators=(",", ":"))
        for p in problems
    )
    return "".join(line + "\n" for line in lines)


def _yaml(folder: Path) -> str:
    def q(value: str) -> str:  # a JSON string is a valid double-quoted YAML scalar
        return json.dumps(value)

    # Only the splits lm-eval reads are listed: train.jsonl is for training, not for lm-eval.
    return f"""\
# Written by evo-compress (evo_compress/reference/task.py); rewritten when it differs.
task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {q(str(folder / "validation.jsonl"))}
    test: {q(str(folder / "test.jsonl"))}
  cache_dir: {q(str(folder.parent / "huggingface" / "datasets"))}
output_type: generate_until
validation_split: validation
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: [{q(TERMINATOR)}]
  max_gen_toks: {MAX_GEN_TOKS}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: {float(TASK_VERSION)}
"""


def _write_if_changed(path: Path, text: str) -> None:
    """Write atomically, and only when the content differs (keeps mtimes and readers calm)."""
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def task_dir(cache_dir: Path) -> Path:
    return Path(cache_dir).resolve() / f"task-{TASK_NAME}-v{TASK_VERSION}"


def ensure_reference_task(cache_dir: Path) -> TaskSpec:
    """Write the task's JSONL splits and lm-eval YAML under ``cache_dir`` (once; a later call
    only checks the bytes) and return its ``TaskSpec``. The YAML holds absolute paths, so a
    moved cache folder is rewritten on the next call."""
    folder = task_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    splits = make_splits()
    for split in ("train", "validation", "test"):
        _write_if_changed(folder / f"{split}.jsonl", _jsonl(getattr(splits, split)))
    _write_if_changed(folder / f"{TASK_NAME}.yaml", _yaml(folder))
    return TaskSpec(
        name=TASK_NAME,
        include_path=folder,
        train_texts=tuple(p.text for p in splits.train),
        prompts=tuple(p.question for p in splits.validation[:N_PROMPTS]),
    )


def iter_problems(path: Path) -> Iterator[Problem]:
    """Read back a JSONL split written by ``ensure_reference_task``."""
    with open(path) as fh:
        for line in fh:
            doc = json.loads(line)
            a, b = doc["question"].rstrip("=").split("+")
            problem = Problem(int(a), int(b))
            if problem.answer != doc["answer"]:
                raise ValueError(f"{path}: wrong answer in {line.strip()}")
            yield problem
