"""Shared fixtures: small configs for the synthetic evaluator, run directories under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# Two shared cores: keep every BLAS/torch pool at one thread in tests.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from evo_compress.app import checked_config  # noqa: E402
from evo_compress.config import PopulationConfig  # noqa: E402


def make_config(tmp_path: Path, **overrides: Any) -> PopulationConfig:
    """A small, fast search config; ``overrides`` merge one level deep per section."""
    data: dict[str, Any] = {
        "name": "test",
        "search": {"population_size": 8, "generations": 4, "seed": 3, "recipes": "conservative"},
        "evaluator": {"name": "synthetic", "settings": {}},
        "cache": {"enabled": False},
        "output": {"runs_root": str(tmp_path / "runs")},
    }
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    return checked_config(data)


@pytest.fixture
def config_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    def factory(**overrides: Any) -> PopulationConfig:
        return make_config(tmp_path, **overrides)

    return factory


# One hypothesis profile for every property test: no deadline (two shared cores make timings
# noisy), no example database in the tree, a moderate number of examples.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "evo-compress",
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("evo-compress")
