"""Read how a run went out of its store: per-generation progress and what each variation
operator (classic or LLM) contributed and cost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evo_compress.runs.hypervolume import run_history
from evo_compress.runs.store import LLMCallRow, RunStore

HISTORY_FIELDS = (
    "generation",
    "hypervolume",
    "front_size",
    "offspring",
    "evaluated",
    "cache_hits",
    "reused",
    "failed",
    "quick",
    "evaluations_total",
    "seconds",
)
SEED_LABEL = "llm-seed"
FALLBACK_PREFIX = "fallback:"


def history(store: RunStore) -> list[dict[str, Any]]:
    """One row per checkpoint, in generation order (``HISTORY_FIELDS``; None where a stat
    is missing). ``hypervolume`` is every generation's front in one box, the last
    checkpoint's (``runs.hypervolume.run_history``), so the column compares across rows."""
    with store.snapshot():  # a search may be writing the run: read one moment of it
        checkpoints = store.checkpoints()
        hv = run_history(store, checkpoints).by_generation
    return [
        {name: checkpoint.stats.get(name) for name in HISTORY_FIELDS}
        | {"generation": checkpoint.generation, "hypervolume": hv.get(checkpoint.generation)}
        for checkpoint in checkpoints
    ]


class _Tally:
    def __init__(self) -> None:
        self.children = 0
        self.evaluated = 0
        self.ok = 0
        self.credited = 0
        self.feasible = 0
        self.dominated = 0
        self.has_parents = True
        self.entered = 0
        self.hv: float | None = None
        self.fallbacks = 0


def operator_stats(store: RunStore) -> list[dict[str, Any]]:
    """One row per operator label, sorted by label: every operator drawn for a child of
    generation 1 on, every LLM operator (even one whose children were all re-drawn), and
    ``llm-seed`` for the first-generation recipes an LLM proposed.

    - ``children``: the children the operator was drawn for; a child of an LLM operator that
      fell back counts for the LLM operator (and in ``fallbacks``), not for its stand-in.
    - ``valid``: share of its evaluated children whose evaluation is ``ok`` (not ``failed``
      and not ``infeasible``).
    - ``feasible``, ``dominated_parent``, ``entered_front``: shares of its credited children
      (the run's operator credit: feasible after constraints, dominates a parent, on the
      run's front after its generation). For ``llm-seed`` they come from the first checkpoint
      and ``dominated_parent`` is None (seeds have no parents).
    - ``hv_contribution``: the sum over its children of the front hypervolume only they cover
      (None when the run never worked it out).
    - ``evaluated``: how many of its children were evaluated (a child the surrogate or a
      crash left out is not).
    - ``llm_calls``, ``llm_valid`` (requests answered with a valid child), ``input_tokens``,
      ``output_tokens``, ``cost`` (None without a price): for LLM operators, None for the
      others.
    - ``tokens_per_evaluated_child``, ``cost_per_evaluated_child``: its tokens (input and
      output) and cost over ``evaluated``, fallbacks included (their requests were paid
      for too); what the candidates the surrogate dropped cost is in it. None for classic
      operators, without an evaluated child, or (cost) without a price.

    Shares are floats in [0, 1], None when there is nothing to divide by.
    """
    with store.snapshot():  # a search may be writing the run: read one moment of it
        return _operator_stats(store)


def _operator_stats(store: RunStore) -> list[dict[str, Any]]:
    individuals = store.individuals()
    evaluations = store.evaluations()
    credits = {row["individual_id"]: row for row in store.credits()}
    tallies: dict[str, _Tally] = {}

    def tally(label: str) -> _Tally:
        return tallies.setdefault(label, _Tally())

    def count_evaluation(entry: _Tally, ident: int) -> None:
        evaluation = evaluations.get(ident)
        if evaluation is not None:
            entry.evaluated += 1
            entry.ok += evaluation.result.status == "ok"

    for row in individuals:
        if row.generation < 1:
            continue
        credit = credits.get(row.id)
        # The credit row names the operators drawn for the child; a child of a generation
        # the run was killed in (or of a store older than the credits) has only its own
        # operators, where a fallback follows the LLM operator it stood in for.
        drawn = credit["operators"] if credit is not None else _drawn(row.operators)
        for label in drawn:
            fell_back = label.startswith(FALLBACK_PREFIX)
            entry = tally(label.removeprefix(FALLBACK_PREFIX))
            entry.children += 1
            entry.fallbacks += fell_back
            count_evaluation(entry, row.id)
            if credit is not None:
                entry.credited += 1
                entry.feasible += bool(credit["feasible"])
                entry.dominated += bool(credit["dominated_parent"])
                entry.entered += bool(credit["entered_front"])
                if credit["hv_contribution"] is not None:
                    entry.hv = (entry.hv or 0.0) + float(credit["hv_contribution"])

    seeds = [r for r in individuals if r.generation == 0 and SEED_LABEL in r.operators]
    if seeds:
        _tally_seeds(store, tally(SEED_LABEL), [r.id for r in seeds], count_evaluation)

    calls: dict[str, list[LLMCallRow]] = {}
    for call in store.llm_calls():
        calls.setdefault(call.operator, []).append(call)
        tally(call.operator)

    rows = []
    for label in sorted(tallies):
        entry = tallies[label]
        mine = calls.get(label, [])
        is_llm = bool(mine) or entry.fallbacks > 0 or label == SEED_LABEL
        costs = [c.cost for c in mine if c.cost is not None]
        tokens = sum(c.input_tokens + c.output_tokens for c in mine)
        per_child = is_llm and entry.evaluated > 0
        rows.append(
            {
                "operator": label,
                "children": entry.children,
                "valid": _share(entry.ok, entry.evaluated),
                "feasible": _share(entry.feasible, entry.credited),
                "dominated_parent": (
                    _share(entry.dominated, entry.credited) if entry.has_parents else None
                ),
                "entered_front": _share(entry.entered, entry.credited),
                "hv_contribution": entry.hv,
                "fallbacks": entry.fallbacks,
                "evaluated": entry.evaluated,
                "llm_calls": len(mine) if is_llm else None,
                "llm_valid": sum(c.outcome == "valid" for c in mine) if is_llm else None,
                "input_tokens": sum(c.input_tokens for c in mine) if is_llm else None,
                "output_tokens": sum(c.output_tokens for c in mine) if is_llm else None,
                "cost": sum(costs) if costs else None,
                "tokens_per_evaluated_child": tokens / entry.evaluated if per_child else None,
                "cost_per_evaluated_child": (
                    sum(costs) / entry.evaluated if per_child and costs else None
                ),
            }
        )
    return rows


def _drawn(operators: list[str]) -> list[str]:
    """The operators drawn for a child, from its recorded operators: ``[llm, fallback:x]``
    (the LLM operator fell back to ``x``) becomes ``[fallback:llm]``, as in its credit."""
    out: list[str] = []
    for op in operators:
        if op.startswith(FALLBACK_PREFIX):
            if out and not out[-1].startswith(FALLBACK_PREFIX):
                out[-1] = FALLBACK_PREFIX + out[-1]
            continue
        out.append(op)
    return out


def _tally_seeds(
    store: RunStore,
    entry: _Tally,
    ids: list[int],
    count_evaluation: Callable[[_Tally, int], None],
) -> None:
    """LLM seeds have no credit rows: feasibility and the front come from checkpoint 0."""
    checkpoints = store.checkpoints()
    first = checkpoints[0] if checkpoints and checkpoints[0].generation == 0 else None
    cv = {e["id"]: float(e["cv"]) for e in first.population} if first is not None else {}
    archive = set(first.algorithm_state.get("archive", [])) if first is not None else set()
    entry.has_parents = False
    for ident in ids:
        entry.children += 1
        count_evaluation(entry, ident)
        if ident in cv:
            entry.credited += 1
            entry.feasible += cv[ident] <= 0
            entry.entered += ident in archive


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None
