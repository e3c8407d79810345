"""Helpers shared by the test suites: seeded samples, worker targets, search runners, CLI
runners and cache corruption (re-exported by ``evo_compress.testing``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from evo_compress.fitness._base import EvaluationResult, Placement
from evo_compress.fitness.synthetic import SyntheticEvaluator
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.progress import ProgressListener

SEED_MAX = 2**32 - 1  # upper bound for seeds drawn by property tests


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def samples(space: SearchSpace, n: int, seed: int = 0) -> list[Recipe]:
    """``n`` recipes drawn from ``space`` with one generator seeded by ``seed``."""
    generator = rng(seed)
    return [space.sample(generator) for _ in range(n)]


def pins_except(space: SearchSpace, *free: str) -> dict[str, object]:
    """Pin every unconditional gene of ``space`` to its default except ``free``: a tiny space
    in which operators run out of new recipes quickly."""
    return {
        name: gene.default
        for name, gene in space.genes.items()
        if name not in free and not gene.active_if.clauses
    }


# Worker targets for the isolation tests: each does one thing a real evaluation might do.
def worker_echo(payload: dict[str, Any]) -> EvaluationResult:
    objectives = {"accuracy": 0.5, "latency": 1.0, "memory": 2.0, "energy": 3.0, "co2": 4.0}
    return EvaluationResult.success(objectives, {"echo": payload, "pid": os.getpid()})


def worker_env(payload: dict[str, Any]) -> EvaluationResult:
    """Echoes the worker's own values of the environment variables ``payload["names"]``."""
    env = {name: os.environ.get(name) for name in payload["names"]}
    objectives = {"accuracy": 0.5, "latency": 1.0, "memory": 2.0, "energy": 3.0, "co2": 4.0}
    return EvaluationResult.success(objectives, {"env": env, "pid": os.getpid()})


def worker_raise(payload: dict[str, Any]) -> EvaluationResult:
    raise ValueError(f"bad recipe {payload.get('name')}")


def worker_sleep(payload: dict[str, Any]) -> EvaluationResult:
    time.sleep(float(payload["seconds"]))
    return worker_echo(payload)


def worker_allocate(payload: dict[str, Any]) -> EvaluationResult:
    blocks = []
    for _ in range(int(payload["mib"])):
        blocks.append(bytearray(1024 * 1024))  # touched, so resident
        time.sleep(0.002)
    return worker_echo({"held": len(blocks)})


def worker_crash(payload: dict[str, Any]) -> EvaluationResult:
    os.kill(os.getpid(), signal.SIGSEGV)
    return worker_echo(payload)


def worker_print_then_raise(payload: dict[str, Any]) -> EvaluationResult:
    print("chatter from a library", flush=True)
    raise RuntimeError("and then it failed")


class PidFileEvaluator(SyntheticEvaluator):
    """For tests: the synthetic evaluator, but each evaluation writes its process id to
    ``<pid_dir>/<recipe short hash>.pid``, and the first one of each recipe then pauses
    ``hold_s`` seconds, so a test can kill that process mid-evaluation (a retry does not
    pause). Both are attributes, not settings: they travel with the pickled evaluator and
    leave its fingerprint alone."""

    pid_dir: Path | None = None
    hold_s: float = 0.0

    def _evaluate(self, recipe: Recipe, placement: Placement) -> EvaluationResult:
        if self.pid_dir is not None:
            path = self.pid_dir / f"{recipe.short_hash}.pid"
            first = not path.exists()
            scratch = path.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_text(str(os.getpid()))
            os.replace(scratch, path)  # a reader never sees half a pid
            if first:
                time.sleep(self.hold_s)
        return super()._evaluate(recipe, placement)


def save_random_llama(folder: Path, dtype: Any = None, **shape: Any) -> Path:
    """A Llama with random weights (seed 0) and the reference tokenizer, saved as a local
    model folder: every code path runs on it, and latency and memory do not depend on the
    weight values. ``shape`` holds LlamaConfig sizes (hidden_size, num_hidden_layers, ...)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evo_compress.reference import build_tokenizer

    tokenizer = build_tokenizer(model_max_length=64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def resume_search(run_dir: Path, **kwargs: Any) -> Path:
    """Resume the run in ``run_dir`` (``kwargs`` go to ``app.resume_search``) to its last
    generation; return the dir."""
    from evo_compress.app import resume_search

    search = resume_search(run_dir, **kwargs)
    try:
        search.run()
    finally:
        search.close()
    return run_dir


def run_search(config: Any, run_dir: Path) -> Path:
    """Run a search from ``config`` to its last generation in ``run_dir``; return the dir."""
    from evo_compress.app import start_search

    search = start_search(config, run_dir=run_dir)
    try:
        search.run()
    finally:
        search.close()
    return run_dir


def search_front(config: Any, run_dir: Path, listener: Any = None) -> list[Any]:
    """Run a search like ``run_search`` and return its front as JSON-ready records."""
    from evo_compress.app import start_search
    from evo_compress.runs.front import load_front

    search = start_search(config, run_dir=run_dir, listener=listener)
    try:
        search.run()
        return [m.to_json() for m in load_front(search.store)]
    finally:
        search.close()


def final_state(run_dir: Path, evaluations: bool = False) -> tuple[Any, ...]:
    """What two equal runs share: the last checkpoint's population and algorithm state,
    every individual (id, hash, parents, operators) and, with ``evaluations``, every
    individual's objectives (in id order, whatever order they were committed in)."""
    from evo_compress.runs import RunStore

    with RunStore.open(run_dir) as store:
        checkpoint = store.last_checkpoint()
        assert checkpoint is not None
        rows = [(r.id, r.hash, r.parents, r.operators) for r in store.individuals()]
        state: tuple[Any, ...] = (checkpoint.population, checkpoint.algorithm_state, rows)
        if evaluations:
            objectives = sorted((i, e.result.objectives) for i, e in store.evaluations().items())
            state = (*state, objectives)
        return state


def crash_evaluations(search: Any, generation: int, after: int, error: type[Exception]) -> None:
    """Make ``search`` raise ``error`` instead of its evaluation number ``after + 1`` in
    ``generation`` (a crash mid-generation, with ``after`` results already in)."""
    original = search.evaluator.evaluate
    calls = {"n": 0}

    def evaluate(
        recipe: Recipe, space: Any, placement: Placement | None = None, race: Any = None
    ) -> Any:
        if getattr(search, "_generation", 0) == generation:
            calls["n"] += 1
            if calls["n"] > after:
                raise error
        return original(recipe, space, placement, race)

    search.evaluator.evaluate = evaluate


class Messages(ProgressListener):
    """A listener that keeps the search's messages (warnings, notes) in ``said``."""

    def __init__(self) -> None:
        self.said: list[str] = []

    def message(self, text: str) -> None:
        self.said.append(text)


_FIVE = '"latency": 1.0, "memory": 1.0, "energy": 1.0, "co2": 1.0'
# Ways a fitness cache entry goes bad (a crash mid-write by an old version, a hand edit, a
# bit flip, another tool's rows): each an UPDATE applied to every entry of a real cache.
CACHE_CORRUPTIONS: dict[str, str] = {
    "missing objectives": "UPDATE entries SET objectives = NULL",
    "objectives missing a name": """UPDATE entries SET objectives = '{"accuracy": 0.5}'""",
    "NaN objective": f"""UPDATE entries SET objectives = '{{"accuracy": NaN, {_FIVE}}}'""",
    "text objective": f"""UPDATE entries SET objectives = '{{"accuracy": "high", {_FIVE}}}'""",
    "unknown status": "UPDATE entries SET status = 'great'",
    "non-UTF-8 metadata": "UPDATE entries SET metadata = CAST(X'7B22FF223A317D' AS TEXT)",
    "metadata not JSON": "UPDATE entries SET metadata = '{not json'",
    "metadata not a mapping": "UPDATE entries SET metadata = '[1, 2]'",
    "duration not a number": "UPDATE entries SET duration_s = 'slow'",
}


def corrupt_cache(path: Path, kind: str) -> int:
    """Apply ``CACHE_CORRUPTIONS[kind]`` to every entry of the cache at ``path``; returns how
    many entries it changed."""
    import sqlite3

    db = sqlite3.connect(path)
    try:
        with db:
            return db.execute(CACHE_CORRUPTIONS[kind]).rowcount
    finally:
        db.close()


CLI = ("-m", "evo_compress.cli")


def run_cli(*args: Any, check: bool = True, **kwargs: Any) -> Any:
    """Run ``evo-compress ARGS`` in a fresh interpreter; ``kwargs`` go to ``subprocess.run``
    (``prefix``: a command put before the interpreter, e.g. to run as another user)."""
    import subprocess
    import sys

    prefix = list(kwargs.pop("prefix", ()))
    proc = subprocess.run(
        [*prefix, sys.executable, *CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: Any, *fragments: str) -> str:
    """``proc`` (a finished CLI process) failed with exit 2 and one ``error:`` line (soft
    wrapping aside) holding every fragment; returns that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    text = " ".join(lines)
    assert text.startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def invoke_cli(*args: Any) -> tuple[int, str, str]:
    """Run the command line in this process (typer's ``CliRunner``): exit code, stdout and
    stderr. An exception the CLI let through is re-raised, so a test sees the traceback a user
    would have seen."""
    from typer.testing import CliRunner

    from evo_compress.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr
