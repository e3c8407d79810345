"""Checkpoint encoding: pymoo's population attributes, its numpy Generator and NSGA-III's
normalisation as plain JSON data (no pickles), and back, bit for bit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pymoo.core.population import Population

# The survival attributes of a population member that a checkpoint keeps.
POP_ATTRIBUTES = ("rank", "crowding", "niche", "dist_to_niche")


def encode_population(pop: Population) -> list[dict[str, Any]]:
    """Each member's individual id, constraint violation and survival attributes."""
    population = []
    for ind in pop:
        entry: dict[str, Any] = {"id": int(ind.get("iid")), "cv": enc(ind.get("CV")[0])}
        for key in POP_ATTRIBUTES:
            value = ind.get(key)
            if value is not None:
                entry[key] = enc(value)
        population.append(entry)
    return population


def decode_attributes(pop: Population, saved: Sequence[dict[str, Any]]) -> None:
    """Set the survival attributes ``encode_population`` kept on the restored ``pop``."""
    for ind, entry in zip(pop, saved, strict=True):
        for key in POP_ATTRIBUTES:
            if key in entry:
                ind.set(key, dec(entry[key]))


def ranking_is_stale(pop: Population, saved: Sequence[dict[str, Any]]) -> bool:
    """Whether a restored population's constraint values differ from its checkpoint's, or a
    feasible member has no rank: its survival ranks no longer describe it."""
    for ind, entry in zip(pop, saved, strict=True):
        cv = float(ind.get("CV")[0])
        if "cv" in entry and cv != dec(entry["cv"]):
            return True
        if cv <= 0 and ind.get("rank") is None:
            return True
    return False


def enc(value: Any) -> Any:
    """JSON has no inf/nan: keep them as strings so checkpoints stay standard JSON."""
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def dec(value: Any) -> Any:
    return float(value) if isinstance(value, str) else value


def rng_state_to_data(rng: np.random.Generator) -> dict[str, Any]:
    # PCG64's 128-bit integers exceed what jq and JavaScript read exactly: keep them as text.
    return _ints_to_text(rng.bit_generator.state)


def rng_state_from_data(data: dict[str, Any]) -> dict[str, Any]:
    return _text_to_ints(data)


def _ints_to_text(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _ints_to_text(v) for k, v in obj.items()}
    if isinstance(obj, int) and not isinstance(obj, bool):
        return {"int": str(obj)}
    return obj


def _text_to_ints(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"int"}:
            return int(obj["int"])
        return {k: _text_to_ints(v) for k, v in obj.items()}
    return obj


def survival_state(algorithm: Any) -> dict[str, Any]:
    """NSGA-III's normalisation remembers ideal, worst and extreme points across generations."""
    norm = getattr(algorithm.survival, "norm", None)
    if norm is None:
        return {}
    state = {}
    for key in ("ideal_point", "worst_point", "nadir_point", "extreme_points"):
        value = getattr(norm, key, None)
        state[key] = None if value is None else np.vectorize(enc, otypes=[object])(value).tolist()
    return state


def restore_survival_state(algorithm: Any, state: dict[str, Any]) -> None:
    norm = getattr(algorithm.survival, "norm", None)
    if norm is None:
        return
    for key, value in state.items():
        if value is not None:
            setattr(norm, key, np.vectorize(dec, otypes=[float])(np.array(value, dtype=object)))
