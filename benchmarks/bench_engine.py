"""Benchmark of the search engine on the synthetic closed-form landscape (``make bench``).

Measures (1) the engine's overhead per generation against bare pymoo NSGA-II on the same
objectives and (2) search quality (hypervolume after a fixed number of evaluations) against
pymoo NSGA-II and random search. Writes BENCHMARKS.md. Nothing here measures a real model.
"""

from __future__ import annotations

import os

# Pin BLAS/OpenMP to one thread before numpy loads: the CI machine has two shared cores and
# thread oversubscription would make the timings noise.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import cProfile
import platform
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pymoo
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.callback import Callback
from pymoo.core.problem import Problem
from pymoo.optimize import minimize
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from recipe_encoding import decode
from sections import write_section

from evo_compress.app import build_space, checked_config, start_search
from evo_compress.config import PopulationConfig
from evo_compress.fitness import EvaluationContext, EvaluationResult, Evaluator, make_evaluator
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.objectives import OBJECTIVES, to_minimization
from evo_compress.progress import GenerationStats, ProgressListener
from evo_compress.runs.hypervolume import REFERENCE_POINT, Box

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT = REPO_ROOT / "BENCHMARKS.md"

# Part 1: engine overhead with an instant evaluator.
TIMING_POP = 100
TIMING_GENERATIONS = 10
TIMING_REPEATS = 5
TIMING_SEED = 0
TARGET_RATIO = 2.0

# Part 2: search quality at a fixed evaluation budget.
QUALITY_POP = 24
QUALITY_GENERATIONS = 10
QUALITY_SEEDS = tuple(range(10))
QUALITY_BUDGET = QUALITY_POP * QUALITY_GENERATIONS

EVALUATOR_SETTINGS: dict[str, Any] = {"cost_s": 0}
EVALUATOR_PHASE = "evaluator (synthetic, closed form)"
# pymoo never ranks infeasible points by F, but it still sorts them: keep F large and finite.
_FAILED_F = 1e12

HypervolumeFn = Callable[[np.ndarray], float]


# ---------------------------------------------------------------------- shared pieces
# The operator sets compared for search quality (the classic defaults first).
NO_SURROGATE: dict[str, Any] = {"enabled": False}
EXPERT_OPERATORS: dict[str, Any] = {
    "mutation": [{"name": "gene"}, {"name": "expert"}],
    "adaptive": {"method": "probability-matching"},
}


def engine_config(
    pop: int,
    generations: int,
    seed: int,
    runs_root: Path,
    operators: dict[str, Any] | None = None,
    *,
    algorithm: str = "nsga2",
    evaluator: str = "synthetic",
    evaluator_settings: dict[str, Any] | None = None,
    constraints: dict[str, float] | None = None,
    surrogate: dict[str, Any] | None = None,
) -> PopulationConfig:
    """The benchmark's search config; the defaults are this file's synthetic runs
    (``surrogate``: the `search.surrogate` section, default: the engine's default)."""
    settings = EVALUATOR_SETTINGS if evaluator_settings is None else evaluator_settings
    return checked_config(
        {
            "name": "bench",
            "constraints": constraints or {},
            "search": {
                "algorithm": algorithm,
                "population_size": pop,
                "offspring_size": pop,
                "generations": generations,
                "seed": seed,
                "recipes": "baseline",
                "operators": operators or {},
                "surrogate": surrogate or {},
            },
            "evaluator": {"name": evaluator, "settings": settings},
            "cache": {"enabled": False},
            "output": {"runs_root": str(runs_root)},
        },
        "benchmark config",
    )


def make_space_and_evaluator(**config_options: Any) -> tuple[SearchSpace, Evaluator]:
    """The same space and evaluator the engine builds from the benchmark config
    (``config_options``: ``engine_config``'s keyword options)."""
    config = engine_config(
        QUALITY_POP, QUALITY_GENERATIONS, 0, Path(tempfile.gettempdir()), **config_options
    )
    space: SearchSpace = build_space(config)
    context = EvaluationContext(config.model, config.hardware, config.carbon)
    return space, make_evaluator(config.evaluator.name, config.evaluator.settings, context)


def feasible_front(results: Sequence[EvaluationResult]) -> np.ndarray:
    """The feasible non-dominated set of everything a method evaluated (minimisation)."""
    F = np.array([to_minimization(r.objectives) for r in results if r.ok and r.objectives])
    if len(F) == 0:
        return np.zeros((0, len(OBJECTIVES)))
    return F[NonDominatedSorting().do(F, only_non_dominated_front=True)]


# ---------------------------------------------------------------------- our engine
class _PhaseTimer(ProgressListener):
    """Timestamps the engine's hooks. A generation runs from the end of the previous one to
    ``generation_finished`` (after its checkpoint); ask ends at ``generation_started``, the
    evaluations (with their store writes) at the last ``evaluation_finished``."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.last_evaluation: list[float] = []
        self.finished: list[float] = []
        self.finished_cpu: list[float] = []
        self.evaluator_s: list[float] = []

    def generation_started(self, generation: int, n_offspring: int) -> None:
        self.started.append(time.perf_counter())
        self.last_evaluation.append(self.started[-1])
        self.evaluator_s.append(0.0)

    def evaluation_finished(self, generation: int, result: EvaluationResult, source: str) -> None:
        self.last_evaluation[-1] = time.perf_counter()
        self.evaluator_s[-1] += result.duration_s

    def generation_finished(self, stats: GenerationStats) -> None:
        self.finished.append(time.perf_counter())
        self.finished_cpu.append(time.process_time())

    def wall_seconds(self) -> list[float]:
        """Wall time of generations 1, 2, ... (generation 0 has no predecessor to time from)."""
        return _differences(self.finished)

    def cpu_seconds(self) -> list[float]:
        return _differences(self.finished_cpu)

    def phases_ms(self) -> dict[str, float]:
        """Median per generation over generations >= 1 (generation 0 has no mating)."""
        gens = range(1, len(self.finished))
        if not gens:
            return {}

        def median_ms(values: list[float]) -> float:
            return 1000.0 * statistics.median(values)

        return {
            "ask (tournament selection, operators, re-draws)": median_ms(
                [self.started[g] - self.finished[g - 1] for g in gens]
            ),
            EVALUATOR_PHASE: median_ms([self.evaluator_s[g] for g in gens]),
            "store reads/writes around each evaluation": median_ms(
                [self.last_evaluation[g] - self.started[g] - self.evaluator_s[g] for g in gens]
            ),
            "tell + front + hypervolume + checkpoint": median_ms(
                [self.finished[g] - self.last_evaluation[g] for g in gens]
            ),
        }


def _differences(stamps: Sequence[float]) -> list[float]:
    return [b - a for a, b in pairwise(stamps)]


@dataclass
class EngineRun:
    stats: list[GenerationStats]
    wall_s: list[float]  # per generation >= 1, checkpoint included
    cpu_s: list[float]  # process CPU time of the same generations
    phases_ms: dict[str, float]
    results: list[EvaluationResult]
    hypervolume: HypervolumeFn  # in the box of the run's last generation


def run_engine(
    pop: int,
    generations: int,
    seed: int,
    profiler: cProfile.Profile | None = None,
    operators: dict[str, Any] | None = None,
    **config_options: Any,
) -> EngineRun:
    """One search; ``results`` are its evaluations in the order it made them, the baseline
    reference (generation -1) left out. ``config_options``: ``engine_config``'s options."""
    with tempfile.TemporaryDirectory(prefix="evo-bench-") as tmp:
        config = engine_config(pop, generations, seed, Path(tmp), operators, **config_options)
        timer = _PhaseTimer()
        search = start_search(config, run_dir=Path(tmp) / "run", listener=timer)
        try:
            if profiler is not None:
                profiler.enable()
            stats = search.run()
            if profiler is not None:
                profiler.disable()
            reference = search.store.individual_at(-1, 0)
            reference_id = reference.id if reference is not None else None
            results = [
                row.result
                for ident, row in search.store.evaluations().items()
                if ident != reference_id
            ]
        finally:
            search.close()
    return EngineRun(
        stats,
        timer.wall_seconds(),
        timer.cpu_seconds(),
        timer.phases_ms(),
        results,
        search.hypervolume,
    )


# ---------------------------------------------------------------------- bare pymoo
class NumericRecipeProblem(Problem):
    """The five objectives of an evaluator over a [0, 1]^n encoding of the space.

    A failed evaluation violates the one constraint; ``constraints`` (with its count), when
    given, computes the whole constraint row instead, failures included. Every evaluated
    result is kept so the hypervolume can be taken over everything the algorithm evaluated."""

    def __init__(
        self,
        space: SearchSpace,
        evaluator: Evaluator,
        seed: int,
        constraints: Callable[[EvaluationResult], np.ndarray] | None = None,
        n_constraints: int = 1,
    ) -> None:
        super().__init__(
            n_var=len(space.genes),
            n_obj=len(OBJECTIVES),
            n_ieq_constr=n_constraints,
            xl=0.0,
            xu=1.0,
        )
        self.space = space
        self.evaluator = evaluator
        self.constraints = constraints
        self.repair_rng = np.random.default_rng(seed)
        self.results: list[EvaluationResult] = []

    def _evaluate(self, x: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        F = np.full((len(x), self.n_obj), _FAILED_F)
        G = np.zeros((len(x), self.n_ieq_constr))
        for i, row in enumerate(x):
            recipe: Recipe = self.space.repair(decode(row, self.space), self.repair_rng)
            result = self.evaluator.evaluate(recipe, self.space)
            self.results.append(result)
            if result.ok and result.objectives is not None:
                F[i] = to_minimization(result.objectives)
            if self.constraints is not None:
                G[i] = self.constraints(result)
            elif not result.ok:
                G[i, 0] = 1.0
        out["F"] = F
        out["G"] = G


class _GenerationClock(Callback):
    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []

    def notify(self, algorithm: Any) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())


@dataclass
class PymooRun:
    seconds: list[float]  # per generation after the first (the initial population)
    cpu_s: list[float]
    results: list[EvaluationResult]


def run_pymoo(pop: int, generations: int, seed: int) -> PymooRun:
    space, evaluator = make_space_and_evaluator()
    problem = NumericRecipeProblem(space, evaluator, seed)
    clock = _GenerationClock()
    minimize(problem, NSGA2(pop_size=pop), ("n_gen", generations), seed=seed, callback=clock)
    evaluator.close()
    return PymooRun(_differences(clock.stamps), _differences(clock.cpu_stamps), problem.results)


# ---------------------------------------------------------------------- random search
def run_random(n: int, seed: int, max_redraws: int = 100) -> list[EvaluationResult]:
    space, evaluator = make_space_and_evaluator()
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    results = []
    for _ in range(n):
        for _attempt in range(max_redraws):
            recipe = space.sample(rng)
            if recipe.hash not in seen:
                break
        seen.add(recipe.hash)
        results.append(evaluator.evaluate(recipe, space))
    evaluator.close()
    return results


# ---------------------------------------------------------------------- the two parts
@dataclass
class OverheadResult:
    """Milliseconds per generation, medians over generations >= 1 and then over repeats."""

    ours_ms: float  # wall time, generation end to generation end
    ours_stats_ms: float  # GenerationStats.seconds
    ours_gen1_ms: float
    ours_last_ms: float
    ours_cpu_ms: float  # process CPU time: robust to other processes on a shared machine
    pymoo_ms: float
    pymoo_cpu_ms: float
    pymoo_gen1_ms: float
    pymoo_last_ms: float
    ours_runs_ms: list[float]
    pymoo_runs_ms: list[float]
    phases_ms: dict[str, float]
    pymoo_evaluator_ms: float
    # The default engine, with surrogate pre-screening (the rows above have it off).
    screened_ms: float
    screened_cpu_ms: float
    screened_runs_ms: list[float]

    @property
    def screened_ratio(self) -> float:
        return self.screened_ms / self.pymoo_ms

    @property
    def screened_cpu_ratio(self) -> float:
        return self.screened_cpu_ms / self.pymoo_cpu_ms

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.pymoo_ms

    @property
    def cpu_ratio(self) -> float:
        return self.ours_cpu_ms / self.pymoo_cpu_ms

    @property
    def stats_ratio(self) -> float:
        return self.ours_stats_ms / self.pymoo_ms

    @property
    def passed(self) -> bool:
        return self.ratio <= TARGET_RATIO


def _median_ms(seconds: Sequence[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def measure_overhead() -> OverheadResult:
    runs: dict[str, list[float]] = {
        k: []
        for k in (
            "ours",
            "ours_cpu",
            "stats",
            "ours1",
            "ours_last",
            "pymoo",
            "pymoo_cpu",
            "pymoo1",
            "pymoo_last",
            "eval",
            "screened",
            "screened_cpu",
        )
    }
    phases: list[dict[str, float]] = []
    for repeat in range(TIMING_REPEATS):
        ours = run_engine(TIMING_POP, TIMING_GENERATIONS, TIMING_SEED, surrogate=NO_SURROGATE)
        runs["ours"].append(_median_ms(ours.wall_s))
        runs["ours_cpu"].append(_median_ms(ours.cpu_s))
        runs["stats"].append(_median_ms([s.seconds for s in ours.stats[1:]]))
        runs["ours1"].append(1000.0 * ours.wall_s[0])
        runs["ours_last"].append(1000.0 * ours.wall_s[-1])
        phases.append(ours.phases_ms)
        bare = run_pymoo(TIMING_POP, TIMING_GENERATIONS, TIMING_SEED)
        runs["pymoo"].append(_median_ms(bare.seconds))
        runs["pymoo_cpu"].append(_median_ms(bare.cpu_s))
        runs["pymoo1"].append(1000.0 * bare.seconds[0])
        runs["pymoo_last"].append(1000.0 * bare.seconds[-1])
        runs["eval"].append(1000.0 * sum(r.duration_s for r in bare.results) / TIMING_GENERATIONS)
        screened = run_engine(TIMING_POP, TIMING_GENERATIONS, TIMING_SEED)
        runs["screened"].append(_median_ms(screened.wall_s))
        runs["screened_cpu"].append(_median_ms(screened.cpu_s))
        print(
            f"  repeat {repeat + 1}/{TIMING_REPEATS}: ours {runs['ours'][-1]:.1f} ms/gen "
            f"(GenerationStats.seconds {runs['stats'][-1]:.1f}), "
            f"pymoo {runs['pymoo'][-1]:.1f} ms/gen; CPU ours {runs['ours_cpu'][-1]:.1f}, "
            f"pymoo {runs['pymoo_cpu'][-1]:.1f}",
            flush=True,
        )
    median = {k: statistics.median(v) for k, v in runs.items()}
    return OverheadResult(
        ours_ms=median["ours"],
        ours_stats_ms=median["stats"],
        ours_cpu_ms=median["ours_cpu"],
        pymoo_cpu_ms=median["pymoo_cpu"],
        ours_gen1_ms=median["ours1"],
        ours_last_ms=median["ours_last"],
        pymoo_ms=median["pymoo"],
        pymoo_gen1_ms=median["pymoo1"],
        pymoo_last_ms=median["pymoo_last"],
        ours_runs_ms=runs["ours"],
        pymoo_runs_ms=runs["pymoo"],
        phases_ms={k: statistics.median(p[k] for p in phases) for k in phases[0]},
        pymoo_evaluator_ms=median["eval"],
        screened_ms=median["screened"],
        screened_cpu_ms=median["screened_cpu"],
        screened_runs_ms=runs["screened"],
    )


@dataclass
class QualityResult:
    hypervolumes: dict[str, list[float]]
    evaluations: dict[str, list[int]]
    box: Box


def measure_quality() -> QualityResult:
    fronts: dict[str, list[np.ndarray]] = {
        "evo-compress NSGA-II": [],
        "evo-compress NSGA-II + expert": [],
        "pymoo NSGA2": [],
        "random": [],
    }
    counts: dict[str, list[int]] = {k: [] for k in fronts}
    for seed in QUALITY_SEEDS:
        ours = run_engine(QUALITY_POP, QUALITY_GENERATIONS, seed)
        expert = run_engine(QUALITY_POP, QUALITY_GENERATIONS, seed, operators=EXPERT_OPERATORS)
        prun = run_pymoo(QUALITY_POP, QUALITY_GENERATIONS, seed)
        rand = run_random(QUALITY_BUDGET, seed)
        for name, results in (
            ("evo-compress NSGA-II", ours.results),
            ("evo-compress NSGA-II + expert", expert.results),
            ("pymoo NSGA2", prun.results),
            ("random", rand),
        ):
            fronts[name].append(feasible_front(results))
            counts[name].append(len(results))
        print(f"  seed {seed} done", flush=True)
    # One box for every method and seed, as `compare` and bench_quality score: the ideal and
    # nadir of the union of all fronts.
    box = Box.of([f for runs in fronts.values() for f in runs])
    hv = {name: [box.hypervolume(f) for f in runs] for name, runs in fronts.items()}
    return QualityResult(hv, counts, box)


# ---------------------------------------------------------------------- report
def machine_info() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = ", ".join(
        f"{v}={os.environ.get(v)}"
        for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    )
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "arch": f"{platform.machine()} ({platform.processor() or 'n/a'})",
        "nproc": str(len(os.sched_getaffinity(0))),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pymoo": pymoo.__version__,
        "threads": threads,
    }


def _range(values: Sequence[float], fmt: str) -> str:
    return f"{format(min(values), fmt)} - {format(max(values), fmt)}"


def render(info: dict[str, str], overhead: OverheadResult, quality: QualityResult) -> str:
    verdict = "PASS" if overhead.passed else "FAIL"
    screened_verdict = "PASS" if overhead.screened_ratio <= TARGET_RATIO else "FAIL"
    lines = [
        "## Search engine (synthetic evaluator)",
        "",
        f"Run {info['date']} on {info['cpu']}, {info['arch']}, {info['nproc']} CPUs (nproc); "
        f"Python {info['python']}, numpy {info['numpy']}, pymoo {info['pymoo']}; "
        f"threads: {info['threads']}.",
        "",
        "**Evaluator: the `synthetic` closed-form landscape** (`cost_s: 0`, fitness cache off). "
        "These numbers are engine costs and search quality on a synthetic problem, "
        "not measurements of a model.",
        "",
        "How to reproduce: `make bench` (runs `python benchmarks/bench_engine.py`, which "
        "rewrites this file).",
        "",
        "### 1. Engine overhead per generation",
        "",
        f"Population {TIMING_POP}, offspring {TIMING_POP}, five objectives, "
        f"{TIMING_GENERATIONS} generations, instant evaluator; {TIMING_REPEATS} runs of each, "
        "interleaved. Per run: the median over generations 1 to "
        f"{TIMING_GENERATIONS - 1} (generation 0, the initial population, is left out); "
        "the table gives the median over runs. evo-compress: wall time from the end of one "
        "generation to the end of the next (ask, evaluation, store writes with one SQLite "
        "commit per evaluation, tell, front, hypervolume, checkpoint), taken from the "
        "`ProgressListener` hooks. pymoo: default `NSGA2` (SBX + PM, duplicate elimination) "
        "on a `Problem` with one real in [0, 1] per gene, decoded and repaired into a recipe "
        "and scored by the same `SyntheticEvaluator`; time between generation callbacks.",
        "",
        "| | ms / generation | per run (ms) | generation 1 (ms) | "
        f"generation {TIMING_GENERATIONS - 1} (ms) |",
        "|---|---:|---|---:|---:|",
        f"| evo-compress engine, surrogate off | {overhead.ours_ms:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in overhead.ours_runs_ms)} | "
        f"{overhead.ours_gen1_ms:.1f} | {overhead.ours_last_ms:.1f} |",
        f"| bare pymoo NSGA2 | {overhead.pymoo_ms:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in overhead.pymoo_runs_ms)} | "
        f"{overhead.pymoo_gen1_ms:.1f} | {overhead.pymoo_last_ms:.1f} |",
        f"| ratio (engine / pymoo) | {overhead.ratio:.2f}x | | "
        f"{overhead.ours_gen1_ms / overhead.pymoo_gen1_ms:.2f}x | "
        f"{overhead.ours_last_ms / overhead.pymoo_last_ms:.2f}x |",
        f"| evo-compress engine, defaults (surrogate pre-screening on) | "
        f"{overhead.screened_ms:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in overhead.screened_runs_ms)} | | |",
        f"| ratio (defaults / pymoo) | {overhead.screened_ratio:.2f}x | | | |",
        "",
        "With pre-screening (the default since issue 13) each generation breeds 4x the "
        "children and fits the Gaussian-process model on up to 400 evaluated recipes before "
        f"it evaluates {TIMING_POP}: {overhead.screened_ms - overhead.ours_ms:.0f} ms more "
        "per generation here, spent to save evaluations (see the `quality` section), which "
        "cost seconds to minutes each with a real model and nothing with this instant "
        f"evaluator. CPU time: {overhead.screened_cpu_ms:.1f} ms "
        f"({overhead.screened_cpu_ratio:.2f}x pymoo).",
        "",
        f"CPU time of the process per generation (not disturbed by other processes on a "
        f"shared machine): engine {overhead.ours_cpu_ms:.1f} ms, pymoo "
        f"{overhead.pymoo_cpu_ms:.1f} ms, ratio {overhead.cpu_ratio:.2f}x.",
        "",
        f"The engine's own `GenerationStats.seconds` gives {overhead.ours_stats_ms:.1f} ms "
        f"({overhead.stats_ratio:.2f}x pymoo): it covers the generation up to the "
        "checkpoint's own commit. The synthetic evaluator itself takes about "
        f"{overhead.phases_ms[EVALUATOR_PHASE]:.1f} ms per generation in the engine and "
        f"{overhead.pymoo_evaluator_ms:.1f} ms in the pymoo run.",
        "",
        "Where the engine's time goes (median per generation over generations >= 1):",
        "",
        "| phase | ms / generation |",
        "|---|---:|",
        *(f"| {name} | {ms:.1f} |" for name, ms in overhead.phases_ms.items()),
        "",
        f"**{verdict}**: the engine's loop (surrogate off) {overhead.ratio:.2f}x bare pymoo "
        f"per generation, wall time (target <= {TARGET_RATIO:g}x; CPU time "
        f"{overhead.cpu_ratio:.2f}x). **{screened_verdict}** with the default pre-screening: "
        f"{overhead.screened_ratio:.2f}x (target <= {TARGET_RATIO:g}x).",
        "",
        "### 2. Search quality at a fixed budget",
        "",
        f"{QUALITY_BUDGET} evaluations per run (population {QUALITY_POP} x "
        f"{QUALITY_GENERATIONS} generations), seeds {', '.join(map(str, QUALITY_SEEDS))}, "
        "no constraints. evo-compress: NSGA-II, default operators (uniform crossover, gene "
        "mutation), `baseline` portfolio; `+ expert`: the same with the rule-based `expert` "
        "mutation beside `gene`, chances adapted by probability matching (the baseline the "
        "LLM operators are judged against; no LLM is called here). "
        "pymoo: default `NSGA2(pop_size="
        f"{QUALITY_POP})` on the numeric encoding. Random: `space.sample` with duplicates "
        "drawn again. Every hypervolume is computed by the same function: the feasible "
        "non-dominated set of everything the method evaluated (the engine's generation -1 "
        "baseline reference excluded), normalised to one box for every method and seed (the "
        "ideal and nadir of the union of those sets, `evo_compress.runs.hypervolume.Box`, as "
        f"`compare` does), reference point {REFERENCE_POINT} in every objective (higher is "
        f"better, at most {REFERENCE_POINT}^5 = {REFERENCE_POINT**5:.3f}).",
        "",
        "| method | evaluations | hypervolume median | min - max |",
        "|---|---:|---:|---|",
    ]
    for name, values in quality.hypervolumes.items():
        count = statistics.median(quality.evaluations[name])
        lines.append(
            f"| {name} | {count:g} | {statistics.median(values):.4f} | {_range(values, '.4f')} |"
        )
    lines += [
        "",
        f"Box: {quality.box.describe()}.",
        "",
    ]
    return "\n".join(lines)


def profile_engine(top: int) -> None:
    """cProfile of ``Search.run`` for the population-100 timing run, by cumulative time."""
    profiler = cProfile.Profile()
    run_engine(TIMING_POP, TIMING_GENERATIONS, TIMING_SEED, profiler)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--profile", action="store_true", help="profile one population-100 engine run and exit"
    )
    args = parser.parse_args(argv)
    if args.profile:
        profile_engine(top=40)
        return 0

    print("evo-compress benchmark on the synthetic closed-form landscape (not a real model)")
    started = time.perf_counter()
    print(f"1. engine overhead: population {TIMING_POP}, {TIMING_GENERATIONS} generations")
    overhead = measure_overhead()
    print(
        f"   ours {overhead.ours_ms:.1f} ms/gen, pymoo {overhead.pymoo_ms:.1f} ms/gen, "
        f"ratio {overhead.ratio:.2f}x -> {'PASS' if overhead.passed else 'FAIL'} "
        f"(target <= {TARGET_RATIO:g}x); CPU time ratio {overhead.cpu_ratio:.2f}x; "
        f"GenerationStats.seconds {overhead.ours_stats_ms:.1f} "
        f"ms/gen ({overhead.stats_ratio:.2f}x, up to the checkpoint commit)"
    )
    print(f"2. search quality: {QUALITY_BUDGET} evaluations, seeds {list(QUALITY_SEEDS)}")
    quality = measure_quality()
    for name, values in quality.hypervolumes.items():
        print(
            f"   {name}: hypervolume median {statistics.median(values):.4f} "
            f"({_range(values, '.4f')})"
        )
    write_section("engine", render(machine_info(), overhead, quality))
    print(f"wrote {OUTPUT} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
