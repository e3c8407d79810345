"""A rule-based mutation that encodes compression know-how: the offline stand-in for the LLM
operators and the baseline they are judged against. No model: a diagnosis of the measured
parent picks a situation, and one applicable rule of that situation makes the move.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from evo_compress.exceptions import OperatorError, RecipeError
from evo_compress.genomes import ChoiceGene, Recipe, SearchSpace, Value
from evo_compress.genomes.genes import RangeGene
from evo_compress.methods import METHODS
from evo_compress.numeric import is_number
from evo_compress.objectives import CONSTRAINTS, constraint_of
from evo_compress.operators._base import Measured, Mutation, Proposal, VariationContext
from evo_compress.operators.classic import GeneMutation, can_vary

# Gene names of the built-in `llm-compression` space; a rule whose genes a custom space lacks
# (or whose target values it does not allow) simply does not apply there.
QUANT = "quant.method"
GROUP_SIZE = "quant.group_size"
PRUNE = "prune.method"
PATTERN = "prune.pattern"
SPARSITY = "prune.sparsity"
RECOVERY = "recovery.method"
LORA_RANK = "recovery.lora_rank"
STEPS = "recovery.steps"
TEMPERATURE = "recovery.temperature"
KV_DTYPE = "kv.dtype"
MAX_SEQS = "serve.max_num_seqs"
GPU_UTIL = "serve.gpu_memory_utilization"
ATTENTION = "serve.attention_backend"

STRUCTURED = ("structured_mlp", "structured_heads")
UNSTRUCTURED = ("magnitude", "wanda")


def _precision_tiers() -> dict[tuple[int, int], tuple[str, ...]]:
    """The registered quantization methods grouped by (weight bits, activation bits), each
    tier in registry order: (16, 16) none, (8, 16) int8 weight-only, (8, 8) int8 / fp8
    compute, (4, 16) the 4-bit methods."""
    tiers: dict[tuple[int, int], tuple[str, ...]] = {}
    for method in METHODS.methods("quantization"):
        key = (method.weight_bits, method.activation_bits)
        tiers[key] = (*tiers.get(key, ()), method.name)
    return tiers


def _ladders() -> tuple[dict[str, tuple[tuple[str, ...], ...]], ...]:
    """One precision level up (accuracy) or down (memory), nearest tier first.

    Up: more weight bits, or the same weight bits with wider activations; the tiers with
    the fewest weight bits first, weight-only before low-precision compute. Down: fewer
    weight bits, the most weight bits (then the widest activations) first."""
    tiers = _precision_tiers()
    raise_: dict[str, tuple[tuple[str, ...], ...]] = {}
    lower: dict[str, tuple[tuple[str, ...], ...]] = {}
    for (w, a), names in tiers.items():
        up = sorted(
            (k for k in tiers if k[0] > w or (k[0] == w and k[1] > a)),
            key=lambda k: (k[0], -k[1]),
        )
        down = sorted((k for k in tiers if k[0] < w), key=lambda k: (-k[0], -k[1]))
        for name in names:
            if up:
                raise_[name] = tuple(tiers[k] for k in up)
            if down:
                lower[name] = tuple(tiers[k] for k in down)
    return raise_, lower


# Method families the rules name, from the method registry (evo_compress.methods).
FOUR_BIT = tuple(m.name for m in METHODS.methods("quantization") if m.weight_bits == 4)
LOW_PRECISION_COMPUTE = tuple(
    m.name
    for m in METHODS.methods("quantization")
    if m.weight_bits == 8 and m.activation_bits == 8
)
_RAISE, _LOWER = _ladders()

# Situations: what the diagnosis of a parent says, and so which rules may answer it.
COST_CONSTRAINTS = {c.key: c.objective for c in CONSTRAINTS if not c.is_drop}
BACK_OFF = frozenset({"failed", "accuracy", "explore"})
PUSH = frozenset({"slack", "explore"})
MEMORY = frozenset({"memory"})
COMPUTE = frozenset({"latency", "energy", "co2"})
SITUATIONS = (
    "failed",
    "accuracy",
    "memory",
    "latency",
    "energy",
    "co2",
    "recovery",
    "slack",
    "boundary",
    "explore",
)

SLACK_FRACTION = 0.5  # a drop <= half the allowed drop leaves room to push
SLACK_ACCURACY = 0.9  # without an accuracy limit: >= 90% of the baseline's accuracy
_OUT_OF_MEMORY = re.compile(r"out of memory|\boom\b", re.IGNORECASE)
_FALLBACK_TRIES = 8
_RULE_TRIES = 3  # draws of one rule (its random values) while its children were all seen


class Rule(ABC):
    """One piece of compression know-how: the situations it answers, when it fits the parent's
    genes, and the move it makes. Subclasses write ``_fits`` and ``apply``."""

    name: ClassVar[str]
    situations: ClassVar[frozenset[str]]
    weight: ClassVar[float] = 1.0

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def applies(self, situation: str, values: Mapping[str, Any]) -> bool:
        return situation in self.situations and self._fits(values)

    @abstractmethod
    def _fits(self, values: Mapping[str, Any]) -> bool:
        """Whether the move exists here: its genes are in the space and its targets allowed."""

    @abstractmethod
    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """The moved gene values (a copy; newly active genes are left to repair)."""

    # ------------------------------------------------------------------ helpers
    def _allowed(self, name: str, candidates: Iterable[Value]) -> list[Value]:
        """The candidates gene ``name`` of the space accepts, in order (none if it is absent)."""
        gene = self.space.genes.get(name)
        out: list[Value] = []
        if gene is None:
            return out
        for candidate in candidates:
            try:
                value = gene.check(candidate)
            except RecipeError:
                continue
            if value not in out:
                out.append(value)
        return out

    def _shift(self, values: Mapping[str, Any], name: str, steps: int) -> Value | None:
        """Numeric gene ``name`` moved ``steps`` grid steps, clipped to its range; ``None`` if
        it is inactive, not numeric, or already at that bound."""
        gene = self.space.genes.get(name)
        if name not in values or not isinstance(gene, RangeGene) or not is_number(values[name]):
            return None
        moved = _shifted(gene, float(values[name]) + steps * gene.step)
        return None if moved == values[name] else moved

    def _at(self, name: str, target: float) -> Value | None:
        """Numeric gene ``name`` set as near ``target`` as its range and step allow."""
        gene = self.space.genes.get(name)
        return _shifted(gene, target) if isinstance(gene, RangeGene) else None

    def _neighbours(self, values: Mapping[str, Any], name: str) -> list[Value]:
        """Values one step away: the adjacent grid points of a number, the adjacent choices of
        a numeric choice (in numeric order), any other choice of a categorical one."""
        gene = self.space.genes.get(name)
        if name not in values or gene is None:
            return []
        value = values[name]
        if isinstance(gene, RangeGene):
            moved = (self._shift(values, name, -1), self._shift(values, name, 1))
            return [v for v in moved if v is not None]
        if isinstance(gene, ChoiceGene):
            if value not in gene.choices:
                return []
            if all(is_number(c) for c in gene.choices):
                ordered = sorted(gene.choices, key=float)
                i = ordered.index(value)
                return [ordered[j] for j in (i - 1, i + 1) if 0 <= j < len(ordered)]
            return [c for c in gene.choices if c != value]
        return [not value]

    def _next_up(self, values: Mapping[str, Any], name: str) -> Value | None:
        """The next larger value of a numeric gene (range or numeric choice), if any."""
        larger = [v for v in self._neighbours(values, name) if float(v) > float(values[name])]
        return larger[0] if larger else None

    def _tier(self, ladder: Mapping[str, tuple[tuple[str, ...], ...]], method: Any) -> list[Value]:
        """The quantization methods of the first tier of ``ladder[method]`` the space allows."""
        for tier in ladder.get(method, ()) if isinstance(method, str) else ():
            allowed = self._allowed(QUANT, tier)
            if allowed:
                return allowed
        return []

    def _set(self, out: dict[str, Any], name: str, value: Value | None) -> None:
        """Set ``name`` when the space has it and accepts ``value``; else leave it to repair."""
        if value is not None and self._allowed(name, [value]):
            out[name] = value


def _shifted(gene: RangeGene, target: float) -> Value:
    """The grid point of ``gene`` nearest ``target`` (which may lie outside the range)."""
    k = min(max(round((target - gene.low) / gene.step), 0), gene.n_steps)
    return gene.check(gene.low + k * gene.step)


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _nm_sparsity(pattern: Any) -> float | None:
    """The sparsity an ``N:M`` pattern fixes (``2:4`` -> 0.5); ``None`` for other patterns."""
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not match or int(match.group(2)) == 0:
        return None
    return 1.0 - int(match.group(1)) / int(match.group(2))


# ---------------------------------------------------------------------- back off


class RaisePrecision(Rule):
    """Fewer bits cost accuracy: one precision level up (4-bit -> int8 weight-only -> none)."""

    name = "raise-precision"
    situations = BACK_OFF
    weight = 2.0

    def _fits(self, values: Mapping[str, Any]) -> bool:
        return bool(self._tier(_RAISE, values.get(QUANT)))

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        values[QUANT] = _pick(rng, self._tier(_RAISE, values[QUANT]))
        return values


class ReduceSparsity(Rule):
    """Accuracy falls fast past moderate sparsity: prune one or two steps less (or stop)."""

    name = "reduce-sparsity"
    situations = BACK_OFF
    weight = 2.0

    def _fits(self, values: Mapping[str, Any]) -> bool:
        if SPARSITY not in values:
            return False
        can_lower = self._shift(values, SPARSITY, -1) is not None
        return can_lower or bool(self._allowed(PRUNE, ["none"]))

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        lower = self._shift(values, SPARSITY, -int(rng.integers(1, 3)))
        if lower is None:
            values[PRUNE] = "none"
        else:
            values[SPARSITY] = lower
        return values


class StructuredToUnstructured(Rule):
    """Removing whole channels or heads hurts far more than Wanda: switch, one step less sparse."""

    name = "structured-to-wanda"
    situations = BACK_OFF

    def _fits(self, values: Mapping[str, Any]) -> bool:
        unstructured = self._allowed(PRUNE, ["wanda", "magnitude"])
        return values.get(PRUNE) in STRUCTURED and bool(unstructured)

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        values[PRUNE] = self._allowed(PRUNE, ["wanda", "magnitude"])[0]
        self._set(values, PATTERN, "unstructured")
        gene = self.space.genes.get(SPARSITY)
        if SPARSITY in values and isinstance(gene, RangeGene):
            values[SPARSITY] = _shifted(gene, float(values[SPARSITY]) - gene.step)
        return values


class DenseSparsityPattern(Rule):
    """An N:M pattern forces 50% on every block: unstructured a step lower keeps more accuracy."""

    name = "nm-to-unstructured"
    situations = BACK_OFF

    def _fits(self, values: Mapping[str, Any]) -> bool:
        return _nm_sparsity(values.get(PATTERN)) is not None and bool(
            self._allowed(PATTERN, ["unstructured"])
        )

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        fixed = _nm_sparsity(values[PATTERN])
        assert fixed is not None
        values[PATTERN] = "unstructured"
        gene = self.space.genes.get(SPARSITY)
        if isinstance(gene, RangeGene):
            self._set(values, SPARSITY, _shifted(gene, fixed - gene.step))
        return values


class AddRecovery(Rule):
    """Heavy compression leaves a gap that a short LoRA (QLoRA on nf4) or distillation closes."""

    name = "add-recovery"
    situations = BACK_OFF | {"recovery"}
    weight = 1.5

    def _options(self, values: Mapping[str, Any]) -> list[Value]:
        if values.get(RECOVERY) != "none":
            return []
        wanted = ["lora", "distill"] + (["qlora"] if values.get(QUANT) == "nf4" else [])
        return self._allowed(RECOVERY, wanted)

    def _fits(self, values: Mapping[str, Any]) -> bool:
        return bool(self._options(values))

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        values[RECOVERY] = _pick(rng, self._options(values))
        return values


class MoreRecovery(Rule):
    """Recovery that already runs recovers more with twice the steps or the next LoRA rank."""

    name = "more-recovery"
    situations = BACK_OFF

    def _moves(self, values: Mapping[str, Any]) -> list[tuple[str, Value]]:
        moves: list[tuple[str, Value]] = []
        gene = self.space.genes.get(STEPS)
        if STEPS in values and isinstance(gene, RangeGene):
            doubled = _shifted(gene, max(2 * float(values[STEPS]), values[STEPS] + gene.step))
            if doubled != values[STEPS]:
                moves.append((STEPS, doubled))
        rank = self._next_up(values, LORA_RANK)
        if rank is not None:
            moves.append((LORA_RANK, rank))
        return moves

    def _fits(self, values: Mapping[str, Any]) -> bool:
        return values.get(RECOVERY) not in (None, "none") and bool(self._moves(values))

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        name, value = _pick(rng, self._moves(values))
        values[name] = value
        return values


# ---------------------------------------------------------------------- memory and compute


class LowerPrecision(Rule):
    """Weights dominate memory: one precision level down (none -> int8 weight-only -> 4-bit)."""

    name = "lower-precision"
    situations = MEMORY | PUSH
    weight = 2.0

    def _fits(self, values: Mapping[str, Any]) -> bool:
        return bool(self._tier(_LOWER, values.get(QUANT)))

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        values[QUANT] = _pick(rng, self._tier(_LOWER, values[QUANT]))
        return values


class StructuredPruning(Rule):
    """Removing channels or heads shrinks every matmul (scattered zeros do not): start or add."""

    name = "structured-pruning"
    situations = COMPUTE
    methods: ClassVar[tuple[str, ...]] = STRUCTURED

    def _fits(self, values: Mapping[str, Any]) -> bool:
        if values.get(PRUNE) in STRUCTURED:
            return self._shift(values, SPARSITY, 1) is not None
        return PRUNE in values and bool(self._allowed(PRUNE, self.methods))

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if values[PRUNE] in STRUCTURED:
            values[SPARSITY] = self._shift(values, SPARSITY, int(rng.integers(1, 3)))
        else:
            values[PRUNE] = _pick(rng, self._allowed(PRUNE, self.methods))
            self._set(values, SPARSITY, self._at(SPARSITY, _pick(rng, [0.1, 0.2])))
        return values


class ShrinkMLP(StructuredPruning):
    """MLP channels hold most weights and only removing them (not zeroing) shrinks memory."""

    name = "shrink-mlp"
    situations = MEMORY
    methods = ("structured_mlp",)


class FP8KVCache(Rule):
    """An fp8 KV cache halves the cache, which dominates memory at long contexts and batches."""

    name = "kv-fp8"
    situations = MEMORY

    def _fits(self, values: Mapping[str, Any]) -> bool:
        return values.get(KV_DTYPE, "fp8") != "fp8" and bool(self._allowed(KV_DTYPE, ["fp8"]))

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        values[KV_DTYPE] = "fp8"
        return values


class LessServingMemory(Rule):
    """The server preallocates its memory fraction: a lower fraction lowers peak memory."""

    name = "less-serving-memory"
    situations = MEMORY
    weight = 0.5

    def _fits(self, values: Mapping[str, Any]) -> bool:
        return self._shift(values, GPU_UTIL, -1) is not None

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        values[GPU_UTIL] = self._shift(values, GPU_UTIL, -int(rng.integers(1, 3)))
        return values


class LowPrecisionCompute(Rule):
    """int8 / fp8 activations run matmuls on faster tensor cores: less latency and energy."""

    name = "low-precision-compute"
    situations = COMPUTE
    weight = 2.0

    def _options(self, values: Mapping[str, Any]) -> list[Value]:
        if QUANT not in values or values[QUANT] in LOW_PRECISION_COMPUTE:
            return []
        return self._allowed(QUANT, LOW_PRECISION_COMPUTE)

    def _fits(self, values: Mapping[str, Any]) -> bool:
        return bool(self._options(values))

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        values[QUANT] = _pick(rng, self._options(values))
        return values


class SemiStructuredSparsity(Rule):
    """2:4 sparsity runs on sparse tensor cores: it speeds matmuls where scattered zeros cannot."""

    name = "nm-pattern"
    situations = COMPUTE

    def _fits(self, values: Mapping[str, Any]) -> bool:
        if values.get(PRUNE) not in ("none", *UNSTRUCTURED):
            return False
        if _nm_sparsity(values.get(PATTERN)) is not None:
            return False
        return bool(self._patterns()) and bool(self._allowed(PRUNE, ["wanda", "magnitude"]))

    def _patterns(self) -> list[Value]:
        gene = self.space.genes.get(PATTERN)
        choices = gene.choices if isinstance(gene, ChoiceGene) else ()
        nm = [c for c in choices if _nm_sparsity(c) is not None]
        return ["2:4"] if "2:4" in nm else nm

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if values[PRUNE] not in UNSTRUCTURED:
            values[PRUNE] = self._allowed(PRUNE, ["wanda", "magnitude"])[0]
        values[PATTERN] = _pick(rng, self._patterns())
        return values


# ---------------------------------------------------------------------- push


class MoreSparsity(Rule):
    """With accuracy to spare, prune one or two steps more."""

    name = "more-sparsity"
    situations = PUSH

    def _fits(self, values: Mapping[str, Any]) -> bool:
        return self._shift(values, SPARSITY, 1) is not None

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        values[SPARSITY] = self._shift(values, SPARSITY, int(rng.integers(1, 3)))
        return values


class StartPruning(Rule):
    """An unpruned model with accuracy to spare takes 20% unstructured Wanda at little loss."""

    name = "start-pruning"
    situations = PUSH

    def _fits(self, values: Mapping[str, Any]) -> bool:
        return values.get(PRUNE) == "none" and bool(self._allowed(PRUNE, ["wanda", "magnitude"]))

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        values[PRUNE] = self._allowed(PRUNE, ["wanda", "magnitude"])[0]
        self._set(values, PATTERN, "unstructured")
        self._set(values, SPARSITY, self._at(SPARSITY, 0.2))
        return values


# ---------------------------------------------------------------------- near the boundary


class _Nudge(Rule):
    """Move one of ``genes`` to a neighbouring value."""

    genes: ClassVar[tuple[str, ...]] = ()

    def _movable(self, values: Mapping[str, Any]) -> list[str]:
        return [name for name in self.genes if self._neighbours(values, name)]

    def _fits(self, values: Mapping[str, Any]) -> bool:
        return bool(self._movable(values))

    def apply(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        name = _pick(rng, self._movable(values))
        values[name] = _pick(rng, self._neighbours(values, name))
        return values


class TuneGroupSize(_Nudge):
    """Near the boundary, the 4-bit group size trades a little memory for accuracy: one size."""

    name = "group-size"
    situations = frozenset({"boundary"})
    genes = (GROUP_SIZE,)


class TuneRecovery(_Nudge):
    """Near the boundary, nudge recovery: steps, LoRA rank or distillation temperature."""

    name = "tune-recovery"
    situations = frozenset({"boundary"})
    genes = (STEPS, LORA_RANK, TEMPERATURE)


class TuneServing(_Nudge):
    """Near the boundary, serving settings move latency and memory without touching accuracy."""

    name = "tune-serving"
    situations = frozenset({"boundary"})
    genes = (MAX_SEQS, GPU_UTIL, ATTENTION)


RULES: tuple[type[Rule], ...] = (
    RaisePrecision,
    ReduceSparsity,
    StructuredToUnstructured,
    DenseSparsityPattern,
    AddRecovery,
    MoreRecovery,
    LowerPrecision,
    ShrinkMLP,
    FP8KVCache,
    LessServingMemory,
    LowPrecisionCompute,
    StructuredPruning,
    SemiStructuredSparsity,
    MoreSparsity,
    StartPruning,
    TuneGroupSize,
    TuneRecovery,
    TuneServing,
)


def heavily_pruned(values: Mapping[str, Any]) -> bool:
    """Sparsity >= 0.4, an N:M pattern, or structured pruning >= 0.3."""
    method = values.get(PRUNE)
    sparsity = values.get(SPARSITY)
    fraction = 0.0
    if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        fraction = float(sparsity)
    if method in STRUCTURED:
        return fraction >= 0.3 - 1e-9
    if method in UNSTRUCTURED:
        return _nm_sparsity(values.get(PATTERN)) is not None or fraction >= 0.4 - 1e-9
    return False


class ExpertMutation(Mutation):
    """Diagnose the measured parent, then apply one rule of compression know-how that fits.

    Situations, in order of precedence: ``failed`` (failed or infeasible; an out-of-memory
    failure counts as ``memory``), ``accuracy`` (the accuracy drop or a task's score drop is
    violated), the most
    violated cost constraint (``memory``, ``latency``, ``energy``, ``co2``), ``recovery``
    (heavily pruned and no recovery), then ``slack`` or ``boundary`` by the accuracy left to
    spend; ``explore`` when nothing was measured. Rules are drawn by weight among those that
    fit; when none fits or none changes the recipe, one random gene moves (``GeneMutation``).
    """

    name = "expert"
    informed = True

    def __init__(self, space: SearchSpace) -> None:
        super().__init__(space)
        self.rules: tuple[Rule, ...] = tuple(rule(space) for rule in RULES)
        self._random = GeneMutation(space)

    def vary(
        self, parents: Sequence[Measured], rng: np.random.Generator, context: VariationContext
    ) -> Proposal:
        if not parents:
            raise OperatorError(f"mutation `{self.name}` needs a parent, got none")
        parent = parents[0]
        situation = self.diagnose(parent, context)
        child, _ = self.propose(dict(parent.recipe), situation, rng, context.seen)
        return Proposal(child, (self.label,))

    def _do(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        child, _ = self.propose(values, "explore", rng)
        return dict(child)

    # ------------------------------------------------------------------ diagnosis
    def diagnose(self, parent: Measured, context: VariationContext) -> str:
        """The parent's situation (one of ``SITUATIONS``), which decides the rules that apply."""
        if parent.status != "ok" or parent.objectives is None:
            if parent.status == "failed" and _OUT_OF_MEMORY.search(parent.reason or ""):
                return "memory"
            return "failed"
        violations = _violations(parent, context)
        # The accuracy drop, or a task's score drop (`max_task_drop.<task>`): both are fixed
        # by compressing less or recovering.
        if any(v > 0 and _is_drop(key) for key, v in violations.items()):
            return "accuracy"
        costs = [(v, key) for key, v in violations.items() if key in COST_CONSTRAINTS and v > 0]
        if costs:
            return COST_CONSTRAINTS[max(costs)[1]]
        values = dict(parent.recipe)
        if heavily_pruned(values) and any(r.applies("recovery", values) for r in self.rules):
            return "recovery"
        slack = _accuracy_slack(parent, context)
        if slack is None:
            return "explore"
        return "slack" if slack else "boundary"

    # ------------------------------------------------------------------ the move
    def propose(
        self,
        values: Mapping[str, Any],
        situation: str,
        rng: np.random.Generator,
        seen: Collection[str] = frozenset(),
    ) -> tuple[Recipe, str]:
        """A repaired child of ``values`` for ``situation`` and the rule that made it
        (``random`` for the fallback; ``none`` when nothing in the space can change).

        A child whose hash is in ``seen`` (evaluated already: the engine would throw it away
        and draw again) is passed over: the rule is tried again (another value), then the
        next rule, then a random gene; only when all of them are seen is the first seen child
        returned. With nothing seen, the first child that differs from the parent is kept."""
        if situation not in SITUATIONS:
            raise OperatorError(f"unknown situation `{situation}`; known: {list(SITUATIONS)}")
        parent = dict(values)
        repeat: tuple[Recipe, str] | None = None  # the first changed child that was seen
        candidates = [rule for rule in self.rules if rule.applies(situation, parent)]
        while candidates:
            weights = np.array([rule.weight for rule in candidates])
            p = weights / weights.sum()
            index = 0 if len(candidates) == 1 else int(rng.choice(len(candidates), p=p))
            rule = candidates.pop(index)
            tried: set[str] = set()
            for _ in range(_RULE_TRIES):
                child = self.space.repair(rule.apply(dict(parent), rng), rng)
                if dict(child) == parent or child.hash in tried:
                    break  # no move, or a rule with nothing else to offer here
                if child.hash not in seen:
                    return child, rule.name
                tried.add(child.hash)
                repeat = repeat or (child, rule.name)
        child = self.space.repair(parent, rng)
        for _ in range(_FALLBACK_TRIES):
            moved = self.space.repair(self._random_gene(parent, rng), rng)
            if dict(moved) == parent:
                continue
            if moved.hash not in seen:
                return moved, "random"
            repeat = repeat or (moved, "random")
        return repeat or (child, "none")

    def _random_gene(self, values: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        mutable = [n for n in values if n in self.space.genes and can_vary(self.space.genes[n])]
        if not mutable:
            return values
        name = _pick(rng, mutable)
        out = dict(values)
        out[name] = self._random._mutate_gene(self.space.genes[name], out[name], rng)
        return out


def _violations(parent: Measured, context: VariationContext) -> dict[str, float]:
    """The parent's violations, completed from its objectives for limits it was not checked
    against (only the sign is read: > 0 is violated)."""
    out = dict(parent.violations)
    objectives = parent.objectives or {}
    reference = context.reference or {}
    for key, limit in context.constraints.items():
        constraint = constraint_of(key)
        if key in out or constraint is None:
            continue
        violation = constraint.violation(objectives, limit, reference)
        if violation is not None:
            out[key] = violation
    return out


def _is_drop(key: str) -> bool:
    constraint = constraint_of(key)
    return constraint is not None and constraint.is_drop


def _accuracy_slack(parent: Measured, context: VariationContext) -> bool | None:
    """Whether the parent has accuracy to spend; ``None`` when nothing says how much it lost."""
    reference = (context.reference or {}).get("accuracy")
    accuracy = (parent.objectives or {}).get("accuracy")
    if reference is None or accuracy is None:
        return None
    limit = context.constraints.get("max_accuracy_drop")
    if limit is not None:
        return reference - accuracy <= SLACK_FRACTION * limit + 1e-9
    return accuracy >= SLACK_ACCURACY * reference - 1e-9
