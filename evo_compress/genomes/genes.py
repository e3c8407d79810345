"""Gene types (choice, int range, float range, bool) and the conditions that switch genes on.

A gene knows its domain: how to check a value, snap it to canonical form, clip a stray value
back into the domain and sample one. How a gene *mutates* is the operators' business
(``evo_compress.operators.classic``), chosen per gene type like pymoo's ``core/mixed.py``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from evo_compress.exceptions import RecipeError, SearchSpaceError
from evo_compress.numeric import as_float, is_int, is_number

Value = str | int | float | bool

MAX_STEPS = 10**6  # values of one range gene: rng.integers needs them to fit an int64

# PyYAML reads an unquoted 2:4 as the base-60 integer 124; say so instead of a bare "not one of".
_SEXAGESIMAL_HINTS = {124: "2:4", 248: "4:8", 128: "2:8"}


@dataclass(frozen=True)
class Clause:
    """One conjunction: every named gene is active and its value is (or is not) in a set."""

    terms: tuple[tuple[str, bool, tuple[Value, ...]], ...]  # (gene, negated, values)

    def genes(self) -> set[str]:
        return {name for name, _, _ in self.terms}

    def holds(self, values: Mapping[str, Value]) -> bool:
        for name, negated, allowed in self.terms:
            if name not in values:
                return False
            inside = values[name] in allowed
            if inside == negated:
                return False
        return True

    def to_data(self) -> dict[str, Any]:
        return {
            name: ({"not_in": list(allowed)} if negated else list(allowed))
            for name, negated, allowed in self.terms
        }

    @classmethod
    def parse(cls, data: Any, where: str) -> Clause:
        if not isinstance(data, Mapping) or not data:
            raise SearchSpaceError(f"`{where}` must be a non-empty mapping gene -> values")
        terms = []
        for name, spec in data.items():
            negated = False
            if isinstance(spec, Mapping):
                if set(spec) == {"in"}:
                    spec = spec["in"]
                elif set(spec) == {"not_in"}:
                    negated, spec = True, spec["not_in"]
                else:
                    raise SearchSpaceError(
                        f"`{where}.{name}` must be a list of values or {{in: [...]}} / "
                        f"{{not_in: [...]}}, got {dict(spec)!r}"
                    )
            if not isinstance(spec, Sequence) or isinstance(spec, str):
                spec = [spec]
            terms.append((str(name), negated, tuple(spec)))
        return cls(tuple(terms))


@dataclass(frozen=True)
class Condition:
    """Any-of a list of clauses (disjunctive normal form). Empty means "always active"."""

    clauses: tuple[Clause, ...] = ()

    def genes(self) -> set[str]:
        out: set[str] = set()
        for clause in self.clauses:
            out |= clause.genes()
        return out

    def holds(self, values: Mapping[str, Value]) -> bool:
        return not self.clauses or any(c.holds(values) for c in self.clauses)

    def to_data(self) -> list[dict[str, Any]] | None:
        return [c.to_data() for c in self.clauses] or None

    @classmethod
    def parse(cls, data: Any, where: str) -> Condition:
        if data is None:
            return cls()
        if isinstance(data, Mapping):
            data = [data]
        if not isinstance(data, Sequence) or isinstance(data, str):
            raise SearchSpaceError(f"`{where}` must be a mapping or a list of mappings")
        return cls(tuple(Clause.parse(item, f"{where}[{i}]") for i, item in enumerate(data)))


@dataclass(frozen=True)
class Gene(ABC):
    """Base of all gene types. ``name`` is dotted (``quant.method``); ``group`` is its prefix."""

    name: str
    default: Value
    active_if: Condition = field(default_factory=Condition)
    doc: str = ""

    type_name: ClassVar[str] = "gene"

    @property
    def group(self) -> str:
        return self.name.split(".", 1)[0]

    @abstractmethod
    def check(self, value: Any) -> Value:
        """Return the canonical form of ``value`` or raise ``RecipeError`` naming the gene."""

    @abstractmethod
    def clip(self, value: Any, rng: np.random.Generator) -> Value:
        """Return the nearest valid value to ``value`` (repair); never raises."""

    @abstractmethod
    def sample(self, rng: np.random.Generator) -> Value:
        """Draw a uniformly random valid value."""

    @abstractmethod
    def domain_data(self) -> dict[str, Any]:
        """The type-specific part of the YAML form."""

    @abstractmethod
    def describe(self) -> str:
        """The domain in words, for help text and docs."""

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type_name, **self.domain_data()}
        data["default"] = self.default
        condition = self.active_if.to_data()
        if condition:
            data["active_if"] = condition
        if self.doc:
            data["doc"] = self.doc
        return data

    def _fail(self, value: Any, expected: str) -> RecipeError:
        return RecipeError(f"`{self.name}` must be {expected}, got {value!r}")


@dataclass(frozen=True)
class ChoiceGene(Gene):
    choices: tuple[Value, ...] = ()

    type_name: ClassVar[str] = "choice"

    def __post_init__(self) -> None:
        if not self.choices:
            raise SearchSpaceError(f"`{self.name}.choices` must not be empty")
        try:
            distinct = len(set(self.choices))
        except TypeError:
            raise SearchSpaceError(
                f"`{self.name}.choices` must be plain values (strings, numbers, booleans), "
                f"got {list(self.choices)}"
            ) from None
        if distinct != len(self.choices):
            raise SearchSpaceError(f"`{self.name}.choices` has duplicates: {list(self.choices)}")

    def _numeric(self) -> bool:
        return all(is_number(c) for c in self.choices)

    @cached_property
    def _canonical(self) -> dict[tuple[Value, bool], Value]:
        """``check``'s answer for each choice, found by hash (repair checks every gene of
        every child); keyed with whether it is a bool, as ``check`` keeps 1 and True apart."""
        table: dict[tuple[Value, bool], Value] = {}
        for choice in reversed(self.choices):  # the first equal choice wins, as in the loop
            if choice == choice:  # NaN equals nothing; leave it to the loop
                table[choice, isinstance(choice, bool)] = choice
        return table

    def check(self, value: Any) -> Value:
        try:
            return self._canonical[value, isinstance(value, bool)]
        except (KeyError, TypeError):  # not a choice, or unhashable: the loop decides
            pass
        for choice in self.choices:
            # 1 == True in Python; a bool must not stand in for a number or vice versa.
            if value == choice and isinstance(value, bool) == isinstance(choice, bool):
                return choice
        error = self._fail(value, f"one of {list(self.choices)}")
        if is_int(value) and int(value) in _SEXAGESIMAL_HINTS:
            quoted = _SEXAGESIMAL_HINTS[int(value)]
            error = RecipeError(
                f"{error} (write '{quoted}' in quotes: YAML reads {quoted} as {value})"
            )
        raise error

    def clip(self, value: Any, rng: np.random.Generator) -> Value:
        try:
            return self._canonical[value, isinstance(value, bool)]
        except (KeyError, TypeError):
            pass
        try:
            return self.check(value)
        except RecipeError:
            pass
        if self._numeric() and is_number(value):
            target = as_float(value)
            if math.isinf(target):
                return (max if target > 0 else min)(self.choices, key=float)
            return min(self.choices, key=lambda c: (abs(float(c) - target), float(c)))
        return self.sample(rng)

    def sample(self, rng: np.random.Generator) -> Value:
        return self.choices[int(rng.integers(len(self.choices)))]

    def domain_data(self) -> dict[str, Any]:
        return {"choices": list(self.choices)}

    def describe(self) -> str:
        return "one of " + ", ".join(str(c) for c in self.choices)


@dataclass(frozen=True)
class BoolGene(Gene):
    type_name: ClassVar[str] = "bool"

    def check(self, value: Any) -> Value:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise self._fail(value, "true or false")

    def clip(self, value: Any, rng: np.random.Generator) -> Value:
        return bool(value) if isinstance(value, (bool, np.bool_, int)) else self.sample(rng)

    def sample(self, rng: np.random.Generator) -> Value:
        return bool(rng.integers(2))

    def domain_data(self) -> dict[str, Any]:
        return {}

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class RangeGene(Gene):
    """A numeric gene on a grid ``low, low + step, ..., high``: the shared base of
    ``IntGene`` and ``FloatGene``, for code that treats both alike (operators, surrogate)."""

    low: float = 0
    high: float = 1
    step: float = 1

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise SearchSpaceError(f"`{self.name}`: low {self.low} must be <= high {self.high}")
        if not self.step > 0:
            raise SearchSpaceError(f"`{self.name}.step` must be > 0, got {self.step}")
        steps = (as_float(self.high) - as_float(self.low)) / as_float(self.step)
        if not steps <= MAX_STEPS:
            raise SearchSpaceError(
                f"`{self.name}`: [{self.low}, {self.high}] in steps of {self.step} has "
                f"{steps:.3g} values; at most {MAX_STEPS:,}"
            )

    @cached_property
    def n_steps(self) -> int:
        return math.floor((self.high - self.low) / self.step + 1e-9)

    def _snap(self, value: float) -> Value:
        k = round((float(value) - self.low) / self.step)
        k = min(max(k, 0), self.n_steps)
        return self._cast(self.low + k * self.step)

    @abstractmethod
    def _cast(self, value: float) -> Value:
        """Turn a snapped number into this gene's canonical type."""

    def check(self, value: Any) -> Value:
        if not is_number(value) or math.isnan(as_float(value)):
            raise self._fail(value, f"a number in [{self.low}, {self.high}]")
        tolerance = self.step * 1e-9
        if not self.low - tolerance <= as_float(value) <= self.high + tolerance:
            raise self._fail(value, f"in [{self.low}, {self.high}]")
        return self._snap(as_float(value))

    def clip(self, value: Any, rng: np.random.Generator) -> Value:
        if type(value) is float:  # the common case, without the generic checks
            number = value
        elif is_number(value):
            number = as_float(value)
        else:
            return self.sample(rng)
        if math.isnan(number):
            return self.sample(rng)
        return self._snap(min(max(number, self.low), self.high))

    def sample(self, rng: np.random.Generator) -> Value:
        return self._cast(self.low + int(rng.integers(self.n_steps + 1)) * self.step)

    def domain_data(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "step": self.step}

    def describe(self) -> str:
        return f"{self.low} to {self.high} in steps of {self.step}"


@dataclass(frozen=True)
class IntGene(RangeGene):
    type_name: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        super().__post_init__()
        for attr in ("low", "high", "step"):
            if not is_int(getattr(self, attr)):
                raise SearchSpaceError(f"`{self.name}.{attr}` must be an integer")

    def check(self, value: Any) -> Value:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not is_int(value):
            raise self._fail(value, f"an integer in [{self.low}, {self.high}]")
        return super().check(value)

    def _cast(self, value: float) -> Value:
        return round(value)


@dataclass(frozen=True)
class FloatGene(RangeGene):
    type_name: ClassVar[str] = "float"

    def _cast(self, value: float) -> Value:
        # Rounding makes 0.05 * 7 + 0.05 and 0.4 the same float, so equal recipes hash equal.
        return float(round(value, 10))


@dataclass(frozen=True)
class Limits:
    """What the back ends accept for a gene they read, whatever domain a space gives it:
    ``kind`` int (whole numbers), number or bool, within ``[low, high]``."""

    kind: str
    low: float | None = None
    high: float | None = None

    def describe(self) -> str:
        if self.kind == "bool":
            return "true or false"
        noun = "an integer" if self.kind == "int" else "a number"
        return f"{noun} in [{self.low:,}, {self.high:,}]"

    def holds(self, value: Any) -> bool:
        if self.kind == "bool":
            return isinstance(value, (bool, np.bool_))
        if self.kind == "int" and not (is_int(value) and not isinstance(value, bool)):
            return False
        if not is_number(value) or not math.isfinite(as_float(value)):
            return False
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        return low <= as_float(value) <= high

    def check(self, gene: Gene) -> None:
        """Raise ``SearchSpaceError`` naming the first domain value outside the limits."""
        values: list[tuple[str, Any]] = []
        if isinstance(gene, ChoiceGene):
            values += [("choices", c) for c in gene.choices]
        elif isinstance(gene, RangeGene):
            values += [("low", gene.low), ("high", gene.high)]
            if self.kind == "int":
                values.append(("step", gene.step))
        elif self.kind != "bool":
            values.append(("type", gene.type_name))
        values.append(("default", gene.default))
        for key, value in values:
            if not self.holds(value):
                raise SearchSpaceError(
                    f"`genes.{gene.name}.{key}`: every value of `{gene.name}` must be "
                    f"{self.describe()} (what the evaluators accept), got {value!r}"
                )


# The genes the evaluators read, and the values they can use. A space (built in, a file or a
# config's overrides) may narrow or move these domains, but not outside the limits.
GENE_LIMITS: dict[str, Limits] = {
    "quant.group_size": Limits("int", 1, 8192),
    "prune.sparsity": Limits("number", 0.0, 0.99),
    "recovery.lora_rank": Limits("int", 1, 4096),
    "recovery.steps": Limits("int", 1, 1_000_000),
    "recovery.temperature": Limits("number", 0.01, 100.0),
    "kv.sliding_window": Limits("bool"),
    "kv.window": Limits("int", 1, 1_048_576),
    "serve.max_num_seqs": Limits("int", 1, 65_536),
    "serve.gpu_memory_utilization": Limits("number", 0.01, 1.0),
}

GENE_TYPES: dict[str, type[Gene]] = {
    cls.type_name: cls for cls in (ChoiceGene, BoolGene, IntGene, FloatGene)
}


def gene_from_data(name: str, data: Mapping[str, Any]) -> Gene:
    """Build a gene from its YAML form, e.g. ``{type: choice, choices: [...], default: ...}``."""
    where = f"genes.{name}"
    if not isinstance(data, Mapping):
        raise SearchSpaceError(f"`{where}` must be a mapping, got {data!r}")
    kind = data.get("type")
    if kind not in GENE_TYPES:
        raise SearchSpaceError(f"`{where}.type` must be one of {sorted(GENE_TYPES)}, got {kind!r}")
    allowed = {"type", "default", "active_if", "doc"} | {
        "choice": {"choices"},
        "bool": set(),
        "int": {"low", "high", "step"},
        "float": {"low", "high", "step"},
    }[kind]
    unknown = set(data) - allowed
    if unknown:
        raise SearchSpaceError(f"`{where}` has unknown keys {sorted(unknown)}")
    kwargs: dict[str, Any] = {
        "name": name,
        "active_if": Condition.parse(data.get("active_if"), f"{where}.active_if"),
        "doc": str(data.get("doc", "")),
    }
    if kind == "choice":
        choices = data.get("choices")
        if not isinstance(choices, Sequence) or isinstance(choices, str):
            raise SearchSpaceError(f"`{where}.choices` must be a list, got {choices!r}")
        kwargs["choices"] = tuple(choices)
        kwargs["default"] = data.get("default", kwargs["choices"][0] if choices else None)
    elif kind == "bool":
        kwargs["default"] = data.get("default", False)
    else:
        for key in ("low", "high"):
            if key not in data:
                raise SearchSpaceError(f"`{where}.{key}` is required for a {kind} gene")
        raw = {
            "low": data["low"],
            "high": data["high"],
            "step": data.get("step", 1 if kind == "int" else 0.01),
        }
        for key, value in raw.items():
            if not is_number(value) or not math.isfinite(as_float(value)):
                raise SearchSpaceError(f"`{where}.{key}` must be a finite number, got {value!r}")
            if kind == "int" and not float(value).is_integer():
                raise SearchSpaceError(f"`{where}.{key}` must be an integer, got {value!r}")
            kwargs[key] = int(value) if kind == "int" else float(value)
        kwargs["default"] = data.get("default", kwargs["low"])
    gene = GENE_TYPES[kind](**kwargs)
    try:
        object.__setattr__(gene, "default", gene.check(gene.default))
    except RecipeError as exc:
        raise SearchSpaceError(f"`{where}.default`: {exc}") from None
    return gene
