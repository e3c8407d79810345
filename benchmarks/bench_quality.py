"""Search quality at equal evaluations: evo-compress against pymoo and Optuna (``make bench``).

Every method gets the same number of evaluations on the same landscape; the hypervolume of each
run's feasible non-dominated set is scored in one normalised box per landscape and budget.
Writes the `quality` section of BENCHMARKS.md (``--quick`` writes only with ``--out``). The
landscapes are closed-form: nothing here measures a model.
"""

from __future__ import annotations

import os

# Pin BLAS/OpenMP to one thread before numpy loads: the CI machine has two shared cores and
# thread oversubscription would make the timings noise.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import landscapes  # registers the `dtlz2` evaluator
import moocore
import numpy as np
import optuna
import scipy
from bench_engine import NumericRecipeProblem, machine_info, make_space_and_evaluator, run_engine
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.optimize import minimize
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from recipe_encoding import encode
from scipy.stats import mannwhitneyu
from sections import OUTPUT, write_section

from evo_compress.config import SearchConfig
from evo_compress.engine import failure_violation
from evo_compress.fitness import EvaluationResult, Evaluator
from evo_compress.genomes import SearchSpace
from evo_compress.genomes.genes import BoolGene, ChoiceGene, FloatGene, IntGene
from evo_compress.objectives import CONSTRAINTS_BY_KEY, OBJECTIVES, to_minimization
from evo_compress.runs.hypervolume import REFERENCE_POINT, Box

BUDGETS = (200, 500)
SEEDS = 10
QUICK_BUDGETS = (60,)
QUICK_SEEDS = 2
# The engine's default population, given to every generational method so that only the
# algorithms differ.
POPULATION = SearchConfig().population_size
# Objectives of a failed evaluation, never read as a point: it is infeasible.
_FAILED_F = 1e12

OURS = "evo-compress NSGA-II"
TPE = "Optuna TPE (multivariate)"
OPTUNA_NSGA2 = "Optuna NSGAII"


@dataclass(frozen=True)
class Landscape:
    """An evaluator by its registered name, its settings and the engine constraints the runs
    on it share."""

    name: str
    evaluator: str
    settings: Mapping[str, Any]
    constraints: Mapping[str, float]
    doc: str

    def config_options(self) -> dict[str, Any]:
        return {
            "evaluator": self.evaluator,
            "evaluator_settings": dict(self.settings),
            "constraints": dict(self.constraints),
        }


LANDSCAPES = (
    Landscape(
        "synthetic",
        "synthetic",
        {"cost_s": 0},
        {},
        "the built-in closed-form landscape (`fitness/synthetic.py`), no constraints; "
        "recipes that do not fit in memory fail",
    ),
    Landscape(
        "dtlz2",
        "dtlz2",
        {},
        landscapes.DTLZ2_CONSTRAINTS,
        "DTLZ2 with five objectives on the recipe's [0, 1]^15 position "
        "(`benchmarks/landscapes.py`), constrained: "
        + ", ".join(f"`{k}: {v:g}`" for k, v in landscapes.DTLZ2_CONSTRAINTS.items()),
    ),
)


# ---------------------------------------------------------------------- constraints
@dataclass(frozen=True)
class Constraints:
    """The engine's constraint row (``engine.problem.Constraints``) for methods outside the engine:
    entry 0 is a failure, then one relative violation per limit; <= 0 is satisfied."""

    limits: Mapping[str, float]
    reference_accuracy: float | None

    @classmethod
    def of(cls, landscape: Landscape, space: SearchSpace, evaluator: Evaluator) -> Constraints:
        """The baseline recipe is the reference for `max_accuracy_drop`, as in the engine."""
        reference = None
        if "max_accuracy_drop" in landscape.constraints:
            result = evaluator.evaluate(space.baseline(), space)
            assert result.ok and result.objectives is not None, result.reason
            reference = result.objectives["accuracy"]
        return cls(dict(landscape.constraints), reference)

    @property
    def count(self) -> int:
        return 1 + len(self.limits)

    def __call__(self, result: EvaluationResult) -> np.ndarray:
        g = np.zeros(self.count)
        if not result.ok or result.objectives is None:
            g[0] = failure_violation(result)
            return g
        reference = (
            None if self.reference_accuracy is None else {"accuracy": self.reference_accuracy}
        )
        for i, (name, limit) in enumerate(self.limits.items(), start=1):
            violation = CONSTRAINTS_BY_KEY[name].violation(result.objectives, limit, reference)
            assert violation is not None, f"{name} needs the baseline's accuracy"
            g[i] = violation
        return g

    def feasible(self, result: EvaluationResult) -> bool:
        return bool(np.all(self(result) <= 0))


# ---------------------------------------------------------------------- methods
Method = Callable[[Landscape, int, int], list[EvaluationResult]]


def _generations(budget: int) -> int:
    return math.ceil(budget / POPULATION)


def run_ours(algorithm: str, surrogate: dict[str, Any] | None = None) -> Method:
    def run(landscape: Landscape, budget: int, seed: int) -> list[EvaluationResult]:
        engine = run_engine(
            POPULATION,
            _generations(budget),
            seed,
            algorithm=algorithm,
            surrogate=surrogate,
            **landscape.config_options(),
        )
        return engine.results

    return run


def run_pymoo(landscape: Landscape, budget: int, seed: int) -> list[EvaluationResult]:
    space, evaluator = make_space_and_evaluator(**landscape.config_options())
    constraints = Constraints.of(landscape, space, evaluator)
    problem = NumericRecipeProblem(space, evaluator, seed, constraints, constraints.count)
    # Uniform random starts, the first one the baseline recipe, as the engine's portfolio.
    start = np.random.default_rng(seed).random((POPULATION, len(space.genes)))
    start[0] = encode(space.baseline(), space)
    algorithm = NSGA2(pop_size=POPULATION, sampling=start)
    minimize(problem, algorithm, ("n_evals", budget), seed=seed)
    evaluator.close()
    return problem.results


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """One suggestion per gene of the space, active or not: ``repair`` drops inactive ones."""
    values: dict[str, Any] = {}
    for name, gene in space.genes.items():
        if isinstance(gene, ChoiceGene):
            values[name] = trial.suggest_categorical(name, list(gene.choices))
        elif isinstance(gene, BoolGene):
            values[name] = trial.suggest_categorical(name, [False, True])
        elif isinstance(gene, IntGene):
            values[name] = trial.suggest_int(name, int(gene.low), int(gene.high), step=gene.step)
        elif isinstance(gene, FloatGene):
            high = round(gene.low + gene.n_steps * gene.step, 10)  # 0.7, not 0.7000000000000001
            values[name] = trial.suggest_float(name, gene.low, high, step=gene.step)
        else:
            raise TypeError(f"gene `{name}` has an unsupported type {type(gene).__name__}")
    return values


# Optuna 5 takes constraints from the trial (`Trial.set_constraint`) and deprecates the
# samplers' `constraints_func`; Optuna 4 has only the latter.
_SET_CONSTRAINT = hasattr(optuna.Trial, "set_constraint")
ConstraintsFunc = Callable[[optuna.trial.FrozenTrial], Sequence[float]]


def _constraints_of_trial(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    return trial.user_attrs["constraints"]


def run_optuna(make_sampler: Callable[[int, ConstraintsFunc | None], Any]) -> Method:
    """An Optuna study over the space; ``make_sampler(seed, constraints_func)``."""

    def run(landscape: Landscape, budget: int, seed: int) -> list[EvaluationResult]:
        space, evaluator = make_space_and_evaluator(**landscape.config_options())
        constraints = Constraints.of(landscape, space, evaluator)
        repair_rng = np.random.default_rng(seed)
        results: list[EvaluationResult] = []

        def objective(trial: optuna.Trial) -> list[float]:
            recipe = space.repair(suggest(trial, space), repair_rng)
            result = evaluator.evaluate(recipe, space)
            results.append(result)
            g = constraints(result).tolist()
            if _SET_CONSTRAINT:
                for i, value in enumerate(g):
                    trial.set_constraint(str(i), value)
            else:
                trial.set_user_attr("constraints", g)
            if not result.ok or result.objectives is None:
                return [_FAILED_F] * len(OBJECTIVES)
            return to_minimization(result.objectives).tolist()

        sampler = make_sampler(seed, None if _SET_CONSTRAINT else _constraints_of_trial)
        study = optuna.create_study(directions=["minimize"] * len(OBJECTIVES), sampler=sampler)
        study.enqueue_trial(dict(space.baseline()))  # the first trial, as the engine's portfolio
        study.optimize(objective, n_trials=budget)
        evaluator.close()
        return results

    return run


METHODS: dict[str, Method] = {
    OURS: run_ours("nsga2"),
    "evo-compress NSGA-III": run_ours("nsga3"),
    "evo-compress NSGA-II, no surrogate": run_ours("nsga2", {"enabled": False}),
    "pymoo NSGA2": run_pymoo,
    TPE: run_optuna(
        lambda seed, cf: optuna.samplers.TPESampler(
            multivariate=True, seed=seed, constraints_func=cf
        )
    ),
    OPTUNA_NSGA2: run_optuna(
        lambda seed, cf: optuna.samplers.NSGAIISampler(
            population_size=POPULATION, seed=seed, constraints_func=cf
        )
    ),
    "Optuna random": run_optuna(lambda seed, cf: optuna.samplers.RandomSampler(seed=seed)),
}


# ---------------------------------------------------------------------- scoring
@dataclass
class Run:
    front: np.ndarray  # the feasible non-dominated set (minimisation), one row per point
    evaluations: int
    feasible: int
    wall_s: float


def feasible_front(
    results: Sequence[EvaluationResult], constraints: Constraints
) -> tuple[np.ndarray, int]:
    """The non-dominated set of the feasible results, and how many results were feasible."""
    F = np.array(
        [
            to_minimization(r.objectives)
            for r in results
            if r.objectives is not None and constraints.feasible(r)
        ]
    ).reshape(-1, len(OBJECTIVES))
    if len(F) == 0:
        return F, 0
    return F[NonDominatedSorting().do(F, only_non_dominated_front=True)], len(F)


def run_method(
    name: str, landscape: Landscape, budget: int, seed: int, constraints: Constraints
) -> Run:
    started = time.perf_counter()
    results = METHODS[name](landscape, budget, seed)
    wall = time.perf_counter() - started
    # Generational methods finish their last generation: only the first `budget` count.
    if len(results) < budget:
        raise RuntimeError(f"{name} made {len(results)} evaluations, fewer than {budget}")
    results = results[:budget]
    front, feasible = feasible_front(results, constraints)
    return Run(front, len(results), feasible, wall)


@dataclass
class Cell:
    """One landscape x budget: every method's runs, one per seed, and their scores."""

    landscape: str
    budget: int
    runs: dict[str, list[Run]] = field(default_factory=dict)
    box: Box | None = None
    hypervolumes: dict[str, list[float]] = field(default_factory=dict)

    def score(self) -> None:
        # The box `compare` uses: ideal and nadir of the union of every run's front.
        self.box = Box.of([run.front for runs in self.runs.values() for run in runs])
        self.hypervolumes = {
            name: [self.box.hypervolume(run.front) for run in runs]
            for name, runs in self.runs.items()
        }


@dataclass(frozen=True)
class Row:
    method: str
    median: float
    iqr: float
    p_value: float | None  # two-sided Mann-Whitney U of evo-compress NSGA-II vs this method
    vs_tpe: float
    vs_nsga2: float
    feasible: float  # median feasible evaluations per run
    wall_s: float  # median per run


def summarise(cell: Cell) -> list[Row]:
    hv = cell.hypervolumes

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else math.nan

    rows = []
    for name, values in hv.items():
        q1, q3 = np.percentile(values, [25, 75])
        p = None
        if name != OURS:
            p = float(mannwhitneyu(hv[OURS], values, alternative="two-sided").pvalue)
        median = statistics.median(values)
        rows.append(
            Row(
                name,
                median,
                float(q3 - q1),
                p,
                ratio(median, statistics.median(hv[TPE])),
                ratio(median, statistics.median(hv[OPTUNA_NSGA2])),
                statistics.median(run.feasible for run in cell.runs[name]),
                statistics.median(run.wall_s for run in cell.runs[name]),
            )
        )
    return rows


# ---------------------------------------------------------------------- the benchmark
def measure(
    budgets: Sequence[int],
    seeds: int,
    landscape_list: Sequence[Landscape] = LANDSCAPES,
    methods: Sequence[str] = tuple(METHODS),
) -> list[Cell]:
    cells = []
    for landscape in landscape_list:
        space, evaluator = make_space_and_evaluator(**landscape.config_options())
        constraints = Constraints.of(landscape, space, evaluator)
        evaluator.close()
        for budget in budgets:
            cell = Cell(landscape.name, budget, {name: [] for name in methods})
            for seed in range(seeds):
                for name in methods:
                    run = run_method(name, landscape, budget, seed, constraints)
                    cell.runs[name].append(run)
                    print(
                        f"  {landscape.name} budget {budget} seed {seed}: {name}: "
                        f"{run.feasible} feasible, front {len(run.front)}, {run.wall_s:.1f} s",
                        flush=True,
                    )
            cell.score()
            for row in summarise(cell):
                print(f"  {landscape.name} {budget}: {_row_text(row)}", flush=True)
            cells.append(cell)
    return cells


def _row_text(row: Row) -> str:
    p = "" if row.p_value is None else f", p {row.p_value:.2g}"
    return (
        f"{row.method}: median {row.median:.4f}, IQR {row.iqr:.4f}{p}, "
        f"x{row.vs_tpe:.3f} TPE, x{row.vs_nsga2:.3f} Optuna NSGAII"
    )


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def render(
    info: dict[str, str], cells: Sequence[Cell], seeds: int, total_s: float, smoke: bool
) -> str:
    lines = [
        "## Search quality against pymoo and Optuna at equal evaluations",
        "",
    ]
    if smoke:
        lines += ["**Smoke run (`--quick`): too few seeds for the numbers to mean anything.**", ""]
    lines += [
        f"Run {info['date']} on {info['cpu']}, {info['arch']}, {info['nproc']} CPUs (nproc); "
        f"Python {info['python']}, numpy {info['numpy']}, pymoo {info['pymoo']}, "
        f"Optuna {optuna.__version__}, scipy {scipy.__version__}, moocore "
        f"{moocore.__version__}; threads: {info['threads']}. Whole benchmark: "
        f"{total_s / 60:.1f} min wall time.",
        "",
        "How to reproduce: `make bench` (runs `python benchmarks/bench_quality.py`, which "
        "rewrites this section; `--seeds N` for another seed count, `--quick` for a smoke run "
        "that writes nothing unless given `--out`).",
        "",
        "**Landscapes** (closed form, nothing measured):",
        "",
        *(f"- `{ls.name}`: {ls.doc}." for ls in LANDSCAPES),
        "",
        f"**Methods**, each given the same number of evaluations (the budget) per run, seeds "
        f"0 to {seeds - 1}; the generational ones with population {POPULATION} (the engine's "
        "default) and their last generation cut at the budget:",
        "",
        "- evo-compress NSGA-II / NSGA-III: the real engine (`Search`) with its defaults "
        "(operators, `baseline` portfolio, surrogate pre-screening with pool 4), "
        "`search.algorithm: nsga2` / `nsga3`, the landscape's `constraints`. Its one extra "
        "evaluation, the baseline reference that `max_accuracy_drop` is measured against, is "
        "not counted (the other methods get the same reference for free). "
        "`no surrogate`: NSGA-II with `search.surrogate.enabled: false`.",
        "- Every method's first evaluation is the baseline recipe (the engine's `baseline` "
        "portfolio; pymoo's first initial point, Optuna's one enqueued trial); the rest of "
        "the initial population is uniform random.",
        f"- pymoo NSGA2: default `NSGA2(pop_size={POPULATION})` on one real in [0, 1] per "
        "gene, decoded and repaired into a recipe, the same constraint rows.",
        "- Optuna (TPESampler(multivariate=True), NSGAIISampler(population_size="
        f"{POPULATION}), RandomSampler), each seeded: one `suggest_*` per gene, the "
        "suggestion repaired into a recipe (inactive genes dropped), five minimised "
        "objectives, the engine's constraint rows (`Trial.set_constraint`; "
        "`constraints_func` before Optuna 5); a failed evaluation is infeasible.",
        "",
        "**Scoring**: per landscape and budget, after every run: the feasible points of each "
        "run, its non-dominated set; ideal and nadir = per-objective min and max over the "
        "union of those sets; objectives normalised to that box "
        "(`evo_compress.runs.hypervolume.Box`, as `evo-compress compare` does), exact hypervolume "
        f"(moocore) with reference point {REFERENCE_POINT} in every objective (higher is "
        f"better, at most {REFERENCE_POINT}^5 = {REFERENCE_POINT**5:.3f}). p: two-sided "
        f"Mann-Whitney U, {OURS} against the method. The ratios divide medians. "
        "Feasible: median feasible evaluations per run; wall: median seconds per run.",
        "",
    ]
    for cell in cells:
        lines += [
            f"### `{cell.landscape}`, {cell.budget} evaluations",
            "",
            "| method | HV median | IQR | p vs NSGA-II | / TPE | / Optuna NSGAII | "
            "feasible | wall (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in summarise(cell):
            lines.append(
                f"| {row.method} | {row.median:.4f} | {row.iqr:.4f} | {_fmt_p(row.p_value)} | "
                f"{row.vs_tpe:.3f} | {row.vs_nsga2:.3f} | {row.feasible:g} | "
                f"{row.wall_s:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds (default {SEEDS})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_SEEDS} seeds, budget {QUICK_BUDGETS[0]}; writes only to --out",
    )
    parser.add_argument("--out", type=Path, default=None, help=f"default {OUTPUT}")
    args = parser.parse_args(argv)
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    print(
        f"search quality: {len(METHODS)} methods x {len(LANDSCAPES)} landscapes x budgets "
        f"{list(budgets)} x {seeds} seeds{' (smoke run)' if args.quick else ''}",
        flush=True,
    )
    started = time.perf_counter()
    cells = measure(budgets, seeds)
    total = time.perf_counter() - started
    out = args.out if args.out is not None else (None if args.quick else OUTPUT)
    if out is not None:
        write_section("quality", render(machine_info(), cells, seeds, total, args.quick), out)
        print(f"wrote {out}")
    print(f"total wall time {total:.0f} s ({total / 60:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
