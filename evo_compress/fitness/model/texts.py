"""The texts an evaluation needs besides its tasks' scoring: latency prompts (the tasks' own
documents as lm-eval formats them, or a file) and calibration / recovery text (the tasks'
training documents, a file, or a ``datasets`` data set). Computed once in the search process
(``prepare``) and handed to every worker as plain strings.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from evo_compress.exceptions import ConfigError, EvaluationError
from evo_compress.fitness.model._base import CalibrationSettings

RECOVERY_TEXTS = 512  # recovery trains on up to this many texts (``load.load_and_compress``)
_CAL = "`evaluator.settings.calibration"


def load_tasks(names: Sequence[str], manager: Any) -> dict[str, list[Any]]:
    """Each name's lm-eval leaf tasks (a group's members, a task itself), loaded once."""
    out: dict[str, list[Any]] = {}
    for name in names:
        loaded = manager.load([name])
        out[name] = list(loaded["tasks"].values())
    return out


def _docs(task: Any, splits: Sequence[str], n: int) -> list[Any]:
    """The first ``n`` documents of the first of ``splits`` the task has (not the whole
    split turned into Python objects: a large one would take seconds)."""
    for split in splits:
        has = getattr(task, f"has_{split}_docs")
        if has():
            docs = getattr(task, f"{split}_docs")()
            if docs is not None:
                return list(itertools.islice(docs, n))
    return []


def _round_robin(streams: list[list[str]], n: int) -> list[str]:
    """Up to ``n`` texts taken in turn from each stream (every task of a group is heard)."""
    out: list[str] = []
    iterators = [iter(s) for s in streams]
    while iterators and len(out) < n:
        alive = []
        for it in iterators:
            text = next(it, None)
            if text is None:
                continue
            alive.append(it)
            if text.strip():
                out.append(text)
            if len(out) >= n:
                break
        iterators = alive
    return out


def _as_text(value: Any) -> str:
    if isinstance(value, list):  # a list of contexts or targets: the first
        value = value[0] if value else ""
    return str(value)


def document_prompts(leaves: Iterable[Any], n: int) -> list[str]:
    """``doc_to_text`` of the tasks' evaluation documents (test, else validation)."""
    streams = []
    for task in leaves:
        docs = _docs(task, ("test", "validation"), n)
        streams.append([_as_text(task.doc_to_text(doc)) for doc in docs])
    return _round_robin(streams, n)


def _target_text(task: Any, doc: Any) -> str:
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(target, int) and 0 <= target < len(choices):
            return str(choices[target])
        if isinstance(target, list) and target and isinstance(target[0], int):
            return str(choices[target[0]])
    return _as_text(target)


def document_texts(leaves: Iterable[Any], n: int) -> list[str]:
    """Whole examples (``doc_to_text`` + target delimiter + target) of the tasks' training
    documents, else their validation documents: text in the tasks' own format."""
    streams = []
    for task in leaves:
        docs = _docs(task, ("training", "validation"), n)
        delimiter = str(getattr(task.config, "target_delimiter", " ") or "")
        streams.append(
            [_as_text(task.doc_to_text(doc)) + delimiter + _target_text(task, doc) for doc in docs]
        )
    return _round_robin(streams, n)


def read_prompt_file(path: Path) -> list[str]:
    """``evaluator.settings.latency_prompt_file``: one prompt a line."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"`evaluator.settings.latency_prompt_file`: cannot read {path}: {_why(exc)}"
        ) from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"`evaluator.settings.latency_prompt_file`: {path} has no prompts")
    return prompts


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc).splitlines()[0]


def _file_texts(calibration: CalibrationSettings, n: int) -> list[str]:
    path = Path(calibration.path or "")
    try:
        raw = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{_CAL}.path`: cannot read {path}: {_why(exc)}") from None
    if path.suffix != ".jsonl":
        return [line for line in raw.splitlines() if line.strip()][:n]
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{_CAL}.path`: {path} line {number}: {exc.msg}") from None
        if not isinstance(row, dict) or calibration.column not in row:
            raise ConfigError(
                f"{_CAL}.column`: {path} line {number} has no column {calibration.column!r}"
            )
        texts.append(str(row[calibration.column]))
        if len(texts) >= n:
            break
    return texts


def _hf_rows(calibration: CalibrationSettings) -> Iterator[Any]:
    """The data set's rows through ``datasets``: a folder written by ``save_to_disk``, a
    folder of data files, or a hub name (the project's HF cache, the hub if reachable)."""
    import datasets

    name = str(calibration.name)
    split = calibration.split or "train"
    folder = Path(name).expanduser()
    try:
        if folder.is_dir() and (
            (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()
        ):
            loaded: Any = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(
                str(folder) if folder.is_dir() else name, calibration.subset, split=split
            )
    except Exception as exc:  # offline, not cached, unknown name or split: one clear line
        raise EvaluationError(
            f"{_CAL}.name`: cannot load data set {name!r} (split {split!r}) from the local "
            f"disk, the Hugging Face cache or the hub ({type(exc).__name__}: "
            f"{_why(exc)})"
        ) from None
    if calibration.column not in loaded.column_names:
        raise ConfigError(
            f"{_CAL}.column`: data set {name!r} has no column {calibration.column!r} "
            f"(it has {', '.join(loaded.column_names)})"
        )
    yield from loaded


def calibration_texts(
    calibration: CalibrationSettings, leaves: Iterable[Any] | None, n: int
) -> list[str]:
    """Up to ``n`` calibration / recovery texts from ``calibration.source``."""
    if calibration.source == "file":
        texts = _file_texts(calibration, n)
        where = f"{_CAL}.path` ({calibration.path})"
    elif calibration.source == "hf":
        texts = []
        for row in _hf_rows(calibration):
            text = str(row[calibration.column])
            if text.strip():
                texts.append(text)
            if len(texts) >= n:
                break
        where = f"{_CAL}.name` ({calibration.name})"
    else:
        texts = document_texts(leaves or [], n)
        where = "the task's training and validation documents"
    if not texts:
        raise ConfigError(f"no calibration text in {where}")
    return texts


def truncate_tokens(tokenizer: Any, texts: Iterable[str], max_tokens: int, keep: str) -> list[str]:
    """Each text cut to at most ``max_tokens`` tokens (``keep``: ``head`` or ``tail``)."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            ids = ids[:max_tokens] if keep == "head" else ids[len(ids) - max_tokens :]
            text = tokenizer.decode(ids)
        out.append(text)
    return out


def served_context(tokenizer: Any, model_path: Path) -> int | None:
    """Tokens the model serves: the tokenizer's and the config's limits, the smaller."""
    limits = []
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < 10**7:  # transformers' "no limit" is 1e30
        limits.append(length)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_path))
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
    except Exception:  # a config transformers cannot read: the tokenizer's limit alone
        pass
    return min(limits) if limits else None


__all__ = [
    "RECOVERY_TEXTS",
    "calibration_texts",
    "document_prompts",
    "document_texts",
    "load_tasks",
    "read_prompt_file",
    "served_context",
    "truncate_tokens",
]
