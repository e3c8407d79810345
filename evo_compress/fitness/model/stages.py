"""Racing's two stages over lm-eval tasks, shared by the real-model back ends (transformers,
vLLM): the quick stage's entries (the first ``quick_limit`` documents of each task), whether
it already scored everything, and the full accuracy from the quick stage's plus the rest's
(``finish_accuracy``), equal to what one stage over every document measures. The decision
between the stages is ``fitness.racing``'s ``RaceRule.stop``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evo_compress.fitness.model.tasks import combine_tasks
from evo_compress.fitness.noise import accuracy_stderr
from evo_compress.fitness.racing import combine_means

# Scores ``entries`` (with ``samples``: those documents of the named tasks instead) and
# returns what ``combine_tasks`` returns plus the ``seconds`` it took.
AccuracyOn = Callable[[list[dict[str, Any]], dict[str, list[int]] | None], dict[str, Any]]


def quick_entries(entries: list[dict[str, Any]], quick_limit: int) -> list[dict[str, Any]]:
    """The quick stage's entries: each task's first ``quick_limit`` documents, or fewer
    when its own limit is smaller (``entries`` carry their limit, None for every one)."""
    return [{**e, "limit": min(quick_limit, e["limit"] or quick_limit)} for e in entries]


def task_total(entry: dict[str, Any], scored: dict[str, Any]) -> int | None:
    """The documents a full run scores of one task: its limit, capped at its documents
    (None: every document, their number unknown, e.g. a group's)."""
    available = scored.get("available")
    if available is None:
        return entry["limit"]
    return min(entry["limit"] or available, available)


def task_done(entry: dict[str, Any], quick_entry: dict[str, Any], quick: dict[str, Any]) -> bool:
    """The quick stage scored every document a full run scores of this task."""
    if entry["limit"] is not None and quick_entry["limit"] >= entry["limit"]:
        return True
    scored = quick["tasks"][entry["name"]]
    total = task_total(entry, scored)
    return total is not None and total <= int(scored["n"])


def all_done(
    entries: list[dict[str, Any]], quick_entries: list[dict[str, Any]], quick: dict[str, Any]
) -> bool:
    """The quick stage scored every document of every task: it is the full stage."""
    return all(task_done(e, q, quick) for e, q in zip(entries, quick_entries, strict=True))


def finish_accuracy(
    quick: dict[str, Any],
    entries: list[dict[str, Any]],
    quick_entries: list[dict[str, Any]],
    accuracy_on: AccuracyOn,
) -> dict[str, Any]:
    """The accuracy on every document a run without racing scores, given the quick stage's
    on the first ones of each task: the rest of a task scored and combined with its first
    ones (a mean metric of one task), else the task scored again in full. Tasks the quick
    stage finished are not scored again; the tasks are then combined as in one stage; the
    ``seconds`` are both stages'."""
    rest_entries: list[dict[str, Any]] = []
    samples: dict[str, list[int]] = {}
    again: set[str] = set()
    for entry, quick_entry in zip(entries, quick_entries, strict=True):
        name = entry["name"]
        scored = quick["tasks"][name]
        if task_done(entry, quick_entry, quick):
            continue
        total = task_total(entry, scored)
        if total is None or scored.get("aggregation") != "mean" or "available" not in scored:
            rest_entries.append(entry)
            again.add(name)
        else:
            rest_entries.append(entry)
            samples[name] = list(range(int(scored["n"]), total))
    rest = accuracy_on(rest_entries, samples or None)
    scores: dict[str, dict[str, Any]] = {}
    how: dict[str, Any] = {}
    for entry in entries:
        name = entry["name"]
        first = {**quick["tasks"][name], "accuracy": quick["tasks"][name]["score"]}
        if name not in rest["tasks"]:
            scores[name], how[name] = first, "scored in the quick stage"
            continue
        later = {**rest["tasks"][name], "accuracy": rest["tasks"][name]["score"]}
        if name in again:
            scores[name], how[name] = later, "scored again in full"
            continue
        k = int(first["n"])
        mean, n, stderr = combine_means(
            [
                (float(first["accuracy"]), k, first.get("stderr")),
                (float(later["accuracy"]), int(later["n"]), later.get("stderr")),
            ]
        )
        if stderr is None:
            stderr, stderr_from = accuracy_stderr(mean, n, None)
        else:
            stderr_from = first.get("stderr_from")
        scores[name] = {**first, "accuracy": mean, "n": n, "stderr": stderr}
        scores[name]["stderr_from"] = stderr_from
        how[name] = {"quick_n": k, "rest_n": int(later["n"])}
    for score in scores.values():
        score.pop("score", None)
        score.pop("weight", None)
    weights = {e["name"]: float(e.get("weight", 1.0)) for e in entries}
    combined = combine_tasks(scores, weights)
    racing = next(iter(how.values())) if len(how) == 1 else how
    return {
        **combined,
        "seconds": float(quick["seconds"]) + float(rest["seconds"]),
        "racing": racing,
    }


__all__ = [
    "AccuracyOn",
    "all_done",
    "finish_accuracy",
    "quick_entries",
    "task_done",
    "task_total",
]
