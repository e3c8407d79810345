"""Benchmark of parallel evaluation (``make bench``): wall time of one generation of the
synthetic problem whose evaluations each take ``cost_s``, for 1, 2 and 4 local workers and
on a local Ray started on the fly, next to the ideal ``cost_s x evaluations / workers``.

The cost is a sleep (the synthetic evaluator computes its objectives in microseconds), so
four workers overlap even on two cores: this measures the pool and the search's
bookkeeping, not a CPU-bound model. Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import machine_info
from sections import OUTPUT, write_section

from evo_compress.app import checked_config, start_search
from evo_compress.progress import GenerationStats, ProgressListener

COST_S = 0.25
OFFSPRING = 16
WORKERS = (1, 2, 4)


@dataclass(frozen=True)
class Timing:
    backend: str
    workers: int
    evaluated: int
    seconds: float

    @property
    def ideal(self) -> float:
        return COST_S * self.evaluated / self.workers

    @property
    def efficiency(self) -> float:
        return self.ideal / self.seconds


class _Stats(ProgressListener):
    def __init__(self) -> None:
        self.generations: list[GenerationStats] = []

    def generation_finished(self, stats: GenerationStats) -> None:
        self.generations.append(stats)


def time_generation(backend: str, workers: int, root: Path) -> Timing:
    """Run two generations; time the second (the first includes the seed portfolio, the
    reference and, on Ray, starting Ray)."""
    evaluation: dict[str, Any] = {"workers": workers, "backend": backend}
    if backend == "ray":
        evaluation["ray"] = {"local_cpus": workers, "cpus_per_task": 1}
    config = checked_config(
        {
            "name": f"bench-{backend}-{workers}",
            "search": {
                "population_size": OFFSPRING,
                "generations": 2,
                "seed": 1,
                "recipes": "baseline",
            },
            "evaluator": {"name": "synthetic", "settings": {"cost_s": COST_S}},
            "evaluation": evaluation,
            "cache": {"enabled": False},
            "output": {"runs_root": str(root)},
        }
    )
    listener = _Stats()
    search = start_search(config, run_dir=root / f"{backend}-{workers}", listener=listener)
    try:
        search.run()
    finally:
        search.close()
    stats = listener.generations[1]
    return Timing(backend, workers, stats.evaluated, stats.seconds)


def render(info: dict[str, str], timings: Sequence[Timing], note: str) -> str:
    lines = [
        "## Parallel evaluation (synthetic, `cost_s` per evaluation)",
        "",
        f"Measured {info['date']} on {info['cpu']} ({info['nproc']} cores, Python "
        f"{info['python']}) by `benchmarks/bench_parallel.py`. One generation of "
        f"{OFFSPRING} offspring, each evaluation a {COST_S:g} s pause of the synthetic "
        "evaluator (a sleep: the workers overlap even on two cores, so this measures the "
        "pool and the search's bookkeeping, not a CPU-bound model). Wall time of the second "
        "generation (`GenerationStats.seconds`: variation, evaluation, survival, checkpoint); "
        "ideal = cost x evaluations / workers.",
        "",
        "| backend | workers | evaluations | wall s | ideal s | efficiency |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in timings:
        lines.append(
            f"| {t.backend} | {t.workers} | {t.evaluated} | {t.seconds:.2f} | "
            f"{t.ideal:.2f} | {t.efficiency:.0%} |"
        )
    if note:
        lines += ["", note]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-ray", action="store_true", help="skip the local Ray runs")
    args = parser.parse_args(argv)
    backends = ["local"]
    note = ""
    if args.no_ray:
        note = "Ray runs skipped (`--no-ray`)."
    elif importlib.util.find_spec("ray") is None:
        note = "Ray runs skipped: Ray is not installed (`pip install 'evo-compress[ray]'`)."
    else:
        backends.append("ray")
    print(f"parallel evaluation: {OFFSPRING} evaluations of {COST_S:g} s per generation")
    started = time.perf_counter()
    timings = []
    with tempfile.TemporaryDirectory(prefix="evo-bench-parallel-") as tmp:
        for backend in backends:
            for workers in WORKERS:
                timing = time_generation(backend, workers, Path(tmp))
                timings.append(timing)
                print(
                    f"   {backend:5s} {workers} worker(s): {timing.seconds:.2f} s "
                    f"(ideal {timing.ideal:.2f} s, {timing.efficiency:.0%})"
                )
    write_section("parallel", render(machine_info(), timings, note))
    print(f"wrote {OUTPUT} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
