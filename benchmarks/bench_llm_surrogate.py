"""The surrogate with LLM operators: how many evaluations go to LLM children that the model
predicted dominated, with screening off (as before LLM requests proposed several candidates)
and on. Writes the `llm-surrogate` section of BENCHMARKS.md.

The LLM is the recorded-reply test provider (``evo_compress_doubles.providers.model_like``
on 127.0.0.1: a reply is a function of the prompt, as a replayed one is), the evaluator the
synthetic landscape, the operators those of the LLM search tests (LLM seeding, LLM crossover
and mutation beside uniform, gene and expert). Each generation the children breeding returns
are judged by a model fitted, as screening fits it, on everything the run evaluated before
the generation: an LLM child is "predicted dominated" when its predicted objectives (the
mean, and the optimistic lower bound screening ranks by) are dominated by a feasible member
of the run's front so far. Only generations with ``min_evaluations`` successful evaluations
count (before that neither run screens).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from bench_engine import machine_info
from evo_compress_doubles.providers import FakeProviderServer, llm_search_sections, model_like
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from sections import write_section

from evo_compress.app import checked_config, start_search
from evo_compress.engine.mating import Child, Mating
from evo_compress.runs import RunStore
from evo_compress.runs.analysis import operator_stats
from evo_compress.surrogate import History, Screening, _transform

KEY_ENV = "EVO_TEST_KEY"
LLM_LABELS = ("crossover:llm", "local")


def config(server: FakeProviderServer, screening: bool, args: Any, seed: int, root: Path) -> Any:
    sections = llm_search_sections(server, generations=args.generations)
    sections["search"] |= {"population_size": args.population, "seed": seed}
    sections["search"]["surrogate"] = {"enabled": screening}
    return checked_config(
        {
            "name": f"bench-llm-surrogate-{'on' if screening else 'off'}",
            "evaluator": {"name": "synthetic", "settings": {}},
            "cache": {"enabled": False},
            "output": {"runs_root": str(root)},
            **sections,
        }
    )


def dominated(
    history: History, recipes: list[Any], space: Any, exploration: float = 1.0
) -> tuple[int, int]:
    """How many of ``recipes`` the model fitted on ``history`` predicts dominated by the
    history's feasible front: by the mean, and by the lower bound (what screening ranks)."""
    ok = ~history.failed
    feasible = ok & (history.G <= 0).all(axis=1) if history.G.size else ok
    transformed = _transform(history.F[ok])  # the model's units (log costs)
    front_rows = transformed[feasible[ok]]
    if not len(front_rows) or not recipes:
        return 0, 0
    front = front_rows[NonDominatedSorting().do(front_rows, only_non_dominated_front=True)]
    counts = []
    for weight in (0.0, exploration):
        predicted, _ = Screening(space, weight).predict(recipes, history)
        hit = 0
        for row in predicted:
            better = np.all(front <= row, axis=1) & np.any(front < row, axis=1)
            hit += bool(better.any())
        counts.append(hit)
    return counts[0], counts[1]


def run(screening: bool, args: Any, seed: int, root: Path) -> dict[str, Any]:
    tally: Counter[str] = Counter()
    original = Mating.breed
    min_evaluations = 16

    def breed(self: Mating, pop: Any, n: int, algorithm: Any) -> list[Child]:
        children = original(self, pop, n, algorithm)
        history = self.state.screening_history()
        if int((~history.failed).sum()) < min_evaluations:
            return children
        llm = [
            c.recipe
            for c in children
            if set(c.operators) & set(LLM_LABELS)
            and not any(op.startswith("fallback:") for op in c.operators)
        ]
        mean, bound = dominated(history, llm, self.space)
        tally["children"] += len(children)
        tally["llm"] += len(llm)
        tally["mean"] += mean
        tally["bound"] += bound
        return children

    with FakeProviderServer(default=model_like()) as server:
        cfg = config(server, screening, args, seed, root)
        min_evaluations = cfg.search.surrogate.min_evaluations
        Mating.breed = breed  # type: ignore[method-assign]
        started = time.perf_counter()
        try:
            search = start_search(cfg, run_dir=root / f"{'on' if screening else 'off'}-{seed}")
            try:
                search.run()
            finally:
                search.close()
        finally:
            Mating.breed = original  # type: ignore[method-assign]
        wall = time.perf_counter() - started
        run_dir = search.store.run_dir
    with RunStore.open(run_dir, read_only=True) as store:
        calls = [c for c in store.llm_calls() if c.operator in LLM_LABELS]
        rows = {r["operator"]: r for r in operator_stats(store)}
        credits = store.credits()
    proposed = 0
    for call in calls:
        if call.outcome == "valid" and call.reply is not None:
            reply = json.loads(call.reply)
            proposed += len(reply["candidates"]) if "candidates" in reply else 1
    evaluated = sum(rows[label]["evaluated"] for label in LLM_LABELS if label in rows)
    by_llm = [c for c in credits if set(c["operators"]) & set(LLM_LABELS)]
    tokens = sum(c.input_tokens + c.output_tokens for c in calls)
    return {
        "tally": tally,
        "requests": len(calls),
        "proposed": proposed,
        "evaluated": evaluated,
        "tokens": tokens,
        "credited": len(by_llm),
        "entered": sum(bool(c["entered_front"]) for c in by_llm),
        "wall": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "sk-bench")
    info = machine_info()
    totals: dict[bool, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-llm-surrogate-") as tmp:
        for screening in (False, True):
            total: dict[str, Any] = {"tally": Counter()}
            for seed in range(args.seeds):
                result = run(screening, args, seed, Path(tmp))
                total["tally"] += result.pop("tally")
                for key, value in result.items():
                    total[key] = total.get(key, 0) + value
            totals[screening] = total
    lines = [
        "## The surrogate with LLM operators",
        "",
        f"Run {info['date']} on {info['cpu']}, {info['arch']}, {info['nproc']} CPUs "
        f"({info['threads']}), Python {info['python']}. The LLM search of the tests "
        f"(population {args.population}, {args.generations} generations, seeds 0-"
        f"{args.seeds - 1}, synthetic evaluator, recorded-reply test provider), with "
        "`search.surrogate.enabled` false (what every search with an LLM operator did "
        "before) and true (defaults: pool 4, each LLM request proposes 4 candidates, "
        "`min_evaluations` 16). Summed over the seeds, generations with at least "
        "`min_evaluations` successful evaluations only.",
        "",
        "| screening | children evaluated | of them by an LLM | predicted dominated (mean) "
        "| predicted dominated (lower bound) | LLM requests | LLM candidates proposed "
        "| tokens per evaluated LLM child | LLM children entering the front | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for screening, total in totals.items():
        tally = total["tally"]
        share = {
            k: f"{tally[k]} ({tally[k] / tally['llm']:.0%})" if tally["llm"] else "0"
            for k in ("mean", "bound")
        }
        per_child = total["tokens"] / total["evaluated"] if total["evaluated"] else float("nan")
        lines.append(
            f"| {'on' if screening else 'off'} | {tally['children']} | {tally['llm']} "
            f"| {share['mean']} | {share['bound']} | {total['requests']} "
            f"| {total['proposed']} | {per_child:.0f} "
            f"| {total['entered']} of {total['credited']} | {total['wall']:.1f} |"
        )
    lines += [
        "",
        "Predicted dominated: the child's predicted objectives, by a model fitted on "
        "everything evaluated before its generation, are dominated by the feasible front "
        "so far. Tokens per evaluated LLM child: every token of the LLM operators' requests "
        "(fallbacks and candidates the surrogate dropped included) over the evaluated "
        "children drawn for them. LLM children entering the front: of every generation, "
        "as the run's operator credit says (the LLM's own children, not its fallbacks'). "
        "The test provider proposes random valid recipes whatever "
        "the prompt says, so the LLM children here are no better than random ones: what "
        "the table shows is the screening of them, not the LLM's judgement.",
        "",
        "How to reproduce: `make bench` (this section: `benchmarks/bench_llm_surrogate.py`).",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("llm-surrogate", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
