"""Golden fronts: fixed seeds give the same searches as the code that wrote
``tests/golden/fronts.json``, so a refactoring that changes behaviour fails here.

Each case records every individual (generation, slot, recipe hash, operators) and the final
front's objectives. Regenerate only for a deliberate change of behaviour, and say so in the
commit: ``EVO_COMPRESS_WRITE_GOLDEN=1 pytest tests/test_golden_fronts.py``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from evo_compress_doubles.providers import FakeProviderServer, llm_search_sections, model_like

from evo_compress.app import start_search
from evo_compress.runs import RunStore
from evo_compress.runs.front import load_front

GOLDEN = Path(__file__).parent / "golden" / "fronts.json"

CASES: dict[str, dict[str, Any]] = {
    # the defaults: NSGA-II with surrogate pre-screening
    "nsga2-default": {"search": {"population_size": 8, "generations": 5, "seed": 3}},
    "nsga3": {"search": {"population_size": 8, "generations": 4, "seed": 4, "algorithm": "nsga3"}},
    # several operators with adaptive chances, no surrogate, racing on, a constraint
    "operators-racing": {
        "search": {
            "population_size": 10,
            "generations": 4,
            "seed": 7,
            "recipes": "aggressive",
            "surrogate": {"enabled": False},
            "operators": {
                "crossover": [
                    {"name": "uniform", "weight": 2.0},
                    {"name": "uniform", "label": "u2"},
                ],
                "mutation": [{"name": "gene"}, {"name": "expert"}],
            },
        },
        "fidelity": {"racing": True, "quick_limit": 20},
        "constraints": {"max_accuracy_drop": 0.05},
    },
    # graded failures past a small device's memory
    "failures": {
        "search": {"population_size": 8, "generations": 4, "seed": 2},
        "evaluator": {"name": "synthetic", "settings": {"device_memory_gb": 4}},
    },
}


def snapshot(run_dir: Path) -> dict[str, Any]:
    with RunStore.open(run_dir) as store:
        individuals = sorted(
            [r.generation, r.slot, r.hash, list(r.operators)] for r in store.individuals()
        )
        front = sorted(
            [m.id, m.feasible, {k: float(v) for k, v in sorted(m.objectives.items())}]
            for m in load_front(store)
        )
    return {"individuals": individuals, "front": front}


def run_case(config: Any, run_dir: Path) -> dict[str, Any]:
    search = start_search(config, run_dir=run_dir)
    try:
        search.run()
    finally:
        search.close()
    return snapshot(run_dir)


def check(name: str, got: dict[str, Any]) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("EVO_COMPRESS_WRITE_GOLDEN"):
        golden[name] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert name in golden, f"no golden front for {name}; see this module's docstring"
    want = golden[name]
    assert got["individuals"] == want["individuals"]
    assert [m[:2] for m in got["front"]] == [m[:2] for m in want["front"]]
    for (*_, objectives), (*_, expected) in zip(got["front"], want["front"], strict=True):
        assert objectives.keys() == expected.keys()
        for key, value in objectives.items():
            assert math.isclose(value, expected[key], rel_tol=1e-9, abs_tol=1e-12), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixed_seeds_give_the_golden_front(config_factory, tmp_path, name):
    check(name, run_case(config_factory(**CASES[name]), tmp_path / "run"))


def test_an_llm_search_gives_the_golden_front(config_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("EVO_TEST_KEY", "sk-golden")
    with FakeProviderServer(default=model_like()) as server:
        config = config_factory(**llm_search_sections(server, generations=3))
        got = run_case(config, tmp_path / "run")
    check("llm", got)
