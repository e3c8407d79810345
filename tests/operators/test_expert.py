"""The rule-based expert mutation: its diagnosis of measured parents and the moves it makes.

The operator contract (parents untouched, valid canonical children, seeded determinism) runs
for ``expert`` in test_classic_operators.py; here are its own behaviours.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evo_compress.exceptions import OperatorError
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.methods import METHODS
from evo_compress.operators import (
    MUTATIONS,
    ExpertMutation,
    Measured,
    Proposal,
    VariationContext,
    make_mutation,
)
from evo_compress.operators.expert import RULES, SITUATIONS, heavily_pruned
from evo_compress.testing import SEED_MAX, pins_except, rng, samples

SPACE = SearchSpace.builtin()
OP = ExpertMutation(SPACE)
REFERENCE = {"accuracy": 0.80, "latency": 20.0, "memory": 16000.0, "energy": 50.0, "co2": 5.0}
SEEDS = range(150)

QUANT_METHODS = METHODS.methods("quantization")
FOUR_BIT = {m.name for m in QUANT_METHODS if m.weight_bits == 4}
WEIGHT_BITS = {m.name: m.weight_bits for m in QUANT_METHODS}
# One precision level above the 4-bit and int8 / fp8 compute methods: 8-bit weight-only.
INT8_WEIGHT_ONLY = {m.name for m in QUANT_METHODS if (m.weight_bits, m.activation_bits) == (8, 16)}
# Accuracy order of the quantization methods: 0 keeps the most (more weight bits, then
# wider activations): none, int8 weight-only, int8 / fp8 compute, the 4-bit methods.
_LEVELS = sorted({(m.weight_bits, m.activation_bits) for m in QUANT_METHODS}, reverse=True)
ACCURACY_RANK = {m.name: _LEVELS.index((m.weight_bits, m.activation_bits)) for m in QUANT_METHODS}


def sparsity(recipe: Mapping[str, Any]) -> float:
    if recipe.get("prune.method", "none") == "none":
        return 0.0
    if recipe.get("prune.pattern") in ("2:4", "4:8"):
        return 0.5
    return float(recipe["prune.sparsity"])


def recovery(recipe: Mapping[str, Any]) -> tuple[int, int, int]:
    """How much recovery training a recipe does, comparable element-wise."""
    if recipe.get("recovery.method", "none") == "none":
        return (0, 0, 0)
    return (1, int(recipe["recovery.steps"]), int(recipe.get("recovery.lora_rank", 0)))


def measured(
    recipe: Recipe,
    status: str = "ok",
    reason: str | None = None,
    violations: Mapping[str, float] | None = None,
    **objectives: float,
) -> Measured:
    values = None if status != "ok" else {**REFERENCE, **objectives}
    return Measured(7, recipe, status, values, dict(violations or {}), reason)


def context(
    space: SearchSpace = SPACE, reference: bool = True, **limits: float
) -> VariationContext:
    return VariationContext(
        space=space, constraints=limits, reference=REFERENCE if reference else None
    )


def children(
    parent: Measured, ctx: VariationContext, op: ExpertMutation = OP
) -> list[tuple[Recipe, Recipe]]:
    """(parent recipe, child) for every seed, checking what every child must satisfy."""
    out = []
    for seed in SEEDS:
        proposal = op.vary([parent], rng(seed), ctx)
        assert isinstance(proposal, Proposal)
        assert proposal.operators == (op.label,)
        child = proposal.recipe
        assert child != parent.recipe
        assert ctx.space.recipe(child.to_dict()) == child
        out.append((parent.recipe, child))
    return out


def changed(parent: Mapping[str, Any], child: Mapping[str, Any]) -> set[str]:
    return {n for n in set(parent) | set(child) if parent.get(n) != child.get(n)}


# ---------------------------------------------------------------------- registration


def test_expert_is_a_registered_informed_mutation() -> None:
    assert "expert" in MUTATIONS
    op = make_mutation("expert", SPACE, {})
    assert isinstance(op, ExpertMutation)
    assert op.name == op.label == "expert"
    assert op.informed and not op.remote


def test_every_rule_is_named_once_and_documented_in_one_line() -> None:
    names = [rule.name for rule in RULES]
    assert len(set(names)) == len(names)
    for rule in RULES:
        doc = rule.__doc__ or ""
        assert doc.endswith(".") and "\n" not in doc, rule.name
        assert set(rule.situations) <= set(SITUATIONS), rule.name


def test_unknown_params_and_situations_raise() -> None:
    with pytest.raises(OperatorError, match=r"`mutation\.params`"):
        make_mutation("expert", SPACE, {"temperature": 1.0})
    with pytest.raises(OperatorError, match="unknown situation `panic`"):
        OP.propose(dict(SPACE.baseline()), "panic", rng())
    with pytest.raises(OperatorError, match="needs a parent"):
        OP.vary([], rng(), context())


# ---------------------------------------------------------------------- diagnosis


def test_diagnosis_follows_the_precedence_of_the_problems() -> None:
    base = SPACE.baseline()
    ctx = context(max_accuracy_drop=0.05, max_memory_mib=8000, max_latency_ms=10)
    both = {"max_accuracy_drop": 0.1, "max_memory_mib": 1.0, "max_latency_ms": 0.5}
    assert OP.diagnose(measured(base, "failed", "worker crashed"), ctx) == "failed"
    assert OP.diagnose(measured(base, "infeasible", "no kernel"), ctx) == "failed"
    assert OP.diagnose(measured(base, "failed", "CUDA out of memory"), ctx) == "memory"
    assert OP.diagnose(measured(base, violations=both), ctx) == "accuracy"
    cost = {"max_accuracy_drop": -0.05, "max_memory_mib": 0.2, "max_latency_ms": 0.5}
    assert OP.diagnose(measured(base, violations=cost), ctx) == "latency"  # the most violated
    cost = {"max_accuracy_drop": -0.05, "max_memory_mib": 0.6, "max_latency_ms": 0.5}
    assert OP.diagnose(measured(base, violations=cost), ctx) == "memory"
    for key, situation in [("max_energy_j", "energy"), ("max_co2_g", "co2")]:
        assert OP.diagnose(measured(base, violations={key: 0.1}), context()) == situation


def test_diagnosis_reads_the_objectives_when_violations_are_missing() -> None:
    base = SPACE.baseline()
    ctx = context(max_accuracy_drop=0.05, max_memory_mib=8000)
    assert OP.diagnose(measured(base, accuracy=0.70, memory=4000), ctx) == "accuracy"
    assert OP.diagnose(measured(base, accuracy=0.79, memory=9000), ctx) == "memory"
    assert OP.diagnose(measured(base, accuracy=0.79, memory=4000), ctx) == "slack"
    assert OP.diagnose(measured(base, accuracy=0.77, memory=4000), ctx) == "boundary"


def test_diagnosis_of_accuracy_slack() -> None:
    base = SPACE.baseline()
    limited = context(max_accuracy_drop=0.04)
    assert OP.diagnose(measured(base, accuracy=0.78), limited) == "slack"  # drop 0.02 = half
    assert OP.diagnose(measured(base, accuracy=0.775), limited) == "boundary"
    unlimited = context()
    assert OP.diagnose(measured(base, accuracy=0.72), unlimited) == "slack"  # 90% of 0.80
    assert OP.diagnose(measured(base, accuracy=0.70), unlimited) == "boundary"
    assert OP.diagnose(measured(base, accuracy=0.70), context(reference=False)) == "explore"


def test_heavy_pruning_without_recovery_is_diagnosed() -> None:
    ctx = context(max_accuracy_drop=0.05)
    heavy = [
        {"prune.method": "wanda", "prune.sparsity": 0.4},
        {"prune.method": "magnitude", "prune.pattern": "2:4"},
        {"prune.method": "structured_mlp", "prune.sparsity": 0.3},
    ]
    light = [
        {"prune.method": "wanda", "prune.sparsity": 0.35},
        {"prune.method": "structured_heads", "prune.sparsity": 0.25},
        {"prune.method": "wanda", "prune.sparsity": 0.6, "recovery.method": "distill"},
    ]
    for values in heavy:
        assert heavily_pruned(SPACE.recipe(values))
        assert OP.diagnose(measured(SPACE.recipe(values), accuracy=0.79), ctx) == "recovery"
    for values in light:
        assert OP.diagnose(measured(SPACE.recipe(values), accuracy=0.79), ctx) == "slack"
    # Where recovery cannot be added, the diagnosis moves on.
    no_recovery = SPACE.with_overrides(pin={"recovery.method": "none"})
    parent = measured(no_recovery.recipe(heavy[0]), accuracy=0.79)
    op = ExpertMutation(no_recovery)
    assert op.diagnose(parent, context(no_recovery, max_accuracy_drop=0.05)) == "slack"


# ---------------------------------------------------------------------- moves


BACKED_OFF_PARENTS = [
    {"quant.method": "awq", "prune.method": "wanda", "prune.sparsity": 0.5},
    {"quant.method": "nf4", "prune.method": "magnitude", "prune.pattern": "2:4"},
    {"quant.method": "gptq", "prune.method": "structured_mlp", "prune.sparsity": 0.4},
    {"quant.method": "rtn", "recovery.method": "lora", "recovery.steps": 200},
    {"quant.method": "fp8", "prune.method": "wanda", "prune.sparsity": 0.05},
]


def assert_backed_off(pairs: list[tuple[Recipe, Recipe]]) -> None:
    moves: Counter[str] = Counter()
    for parent, child in pairs:
        assert ACCURACY_RANK[child["quant.method"]] <= ACCURACY_RANK[parent["quant.method"]]
        assert sparsity(child) <= sparsity(parent)
        assert recovery(child) >= recovery(parent)
        if ACCURACY_RANK[child["quant.method"]] < ACCURACY_RANK[parent["quant.method"]]:
            moves["precision"] += 1
        elif sparsity(child) < sparsity(parent) or (
            child.get("prune.method") != parent.get("prune.method")
            or child.get("prune.pattern") != parent.get("prune.pattern")
        ):
            moves["pruning"] += 1
        else:
            assert recovery(child) > recovery(parent), (dict(parent), dict(child))
            moves["recovery"] += 1
    assert moves["precision"] > 0 and moves["recovery"] > 0


@pytest.mark.parametrize("values", BACKED_OFF_PARENTS)
def test_an_accuracy_violation_backs_off(values: dict[str, Any]) -> None:
    ctx = context(max_accuracy_drop=0.05, max_memory_mib=8000)
    parent = measured(
        SPACE.recipe(values),
        accuracy=0.6,
        memory=6000,
        violations={"max_accuracy_drop": 0.15, "max_memory_mib": -0.25},
    )
    assert OP.diagnose(parent, ctx) == "accuracy"
    pairs = children(parent, ctx)
    assert_backed_off(pairs)
    if sparsity(parent.recipe) > 0:
        assert any(sparsity(c) < sparsity(p) for p, c in pairs)


@pytest.mark.parametrize("status", ["failed", "infeasible"])
@pytest.mark.parametrize("values", BACKED_OFF_PARENTS[:3])
def test_a_failed_parent_backs_off(values: dict[str, Any], status: str) -> None:
    parent = measured(SPACE.recipe(values), status, "the kernel raised")
    ctx = context(max_accuracy_drop=0.05)
    assert OP.diagnose(parent, ctx) == "failed"
    assert_backed_off(children(parent, ctx))


def test_backing_off_steps_precision_up_one_level() -> None:
    ctx = context(max_accuracy_drop=0.05)
    for method, expected in [
        ("awq", INT8_WEIGHT_ONLY),
        ("fp8", INT8_WEIGHT_ONLY),
        ("int8_w8a8", INT8_WEIGHT_ONLY),
        ("int8_weight_only", {"none"}),
    ]:
        parent = measured(SPACE.recipe({"quant.method": method}), "failed")
        raised = {
            c["quant.method"]
            for _, c in children(parent, ctx)
            if c["quant.method"] != parent.recipe["quant.method"]
        }
        assert raised == expected, method


def test_a_memory_violation_at_full_precision_compresses() -> None:
    ctx = context(max_memory_mib=8000, max_accuracy_drop=0.05)
    parent = measured(
        SPACE.baseline(),
        memory=16000,
        violations={"max_memory_mib": 1.0, "max_accuracy_drop": -0.05},
    )
    assert OP.diagnose(parent, ctx) == "memory"
    moves: Counter[str] = Counter()
    for p, c in children(parent, ctx):
        assert WEIGHT_BITS[c["quant.method"]] <= WEIGHT_BITS[p["quant.method"]]
        assert sparsity(c) >= sparsity(p)
        assert recovery(c) == recovery(p)
        if WEIGHT_BITS[c["quant.method"]] < 16:
            moves["precision"] += 1
            assert c["quant.method"] in INT8_WEIGHT_ONLY  # one level, not straight to 4-bit
        elif sparsity(c) > 0:
            moves["sparsity"] += 1
            assert c["prune.method"] == "structured_mlp"  # zeros alone do not shrink memory
        elif c["kv.dtype"] == "fp8":
            moves["kv"] += 1
        else:
            assert c["serve.gpu_memory_utilization"] < p["serve.gpu_memory_utilization"]
            moves["serving"] += 1
    assert moves["precision"] > moves["sparsity"] > 0
    assert moves["kv"] > 0 and moves["serving"] > 0


def test_a_memory_violation_at_int8_goes_to_four_bit() -> None:
    ctx = context(max_memory_mib=8000)
    parent = measured(
        SPACE.recipe({"quant.method": "int8_weight_only", "kv.dtype": "fp8"}),
        violations={"max_memory_mib": 0.2},
    )
    methods = {c["quant.method"] for _, c in children(parent, ctx)}
    assert methods - {"int8_weight_only"} == FOUR_BIT


def test_a_latency_violation_cuts_compute() -> None:
    ctx = context(max_latency_ms=10)
    parent = measured(SPACE.baseline(), latency=20, violations={"max_latency_ms": 1.0})
    assert OP.diagnose(parent, ctx) == "latency"
    moves: Counter[str] = Counter()
    for _, c in children(parent, ctx):
        if c["quant.method"] in ("int8_w8a8", "fp8"):
            moves["compute"] += 1
        elif c["prune.method"] in ("structured_mlp", "structured_heads"):
            moves["structured"] += 1
        else:
            assert c.get("prune.pattern") == "2:4", dict(c)
            moves["2:4"] += 1
    assert len(moves) == 3


def test_heavy_pruning_without_recovery_gets_recovery() -> None:
    ctx = context(max_accuracy_drop=0.05)
    for values in BACKED_OFF_PARENTS[:3]:
        parent = measured(SPACE.recipe(values), accuracy=0.78)
        assert OP.diagnose(parent, ctx) == "recovery"
        added = set()
        for p, c in children(parent, ctx):
            # only recovery moves: the compression itself stays
            assert all(name.startswith("recovery.") for name in changed(p, c))
            added.add(c["recovery.method"])
        # QLoRA is the recovery made for an nf4 base
        qlora = {"qlora"} if values["quant.method"] == "nf4" else set()
        assert added == {"lora", "distill"} | qlora


def test_slack_pushes_compression() -> None:
    ctx = context(max_accuracy_drop=0.05)
    pruned = {"quant.method": "int8_weight_only", "prune.method": "wanda", "prune.sparsity": 0.2}
    for values in [{}, pruned]:
        parent = measured(SPACE.recipe(values), accuracy=0.79)
        assert OP.diagnose(parent, ctx) == "slack"
        for p, c in children(parent, ctx):
            assert WEIGHT_BITS[c["quant.method"]] <= WEIGHT_BITS[p["quant.method"]]
            assert sparsity(c) >= sparsity(p)
            assert (WEIGHT_BITS[c["quant.method"]], -sparsity(c)) < (
                WEIGHT_BITS[p["quant.method"]],
                -sparsity(p),
            )
    # An unpruned model starts at 20% unstructured Wanda.
    parent = measured(SPACE.baseline(), accuracy=0.8)
    started = {c["prune.sparsity"] for _, c in children(parent, ctx) if "prune.sparsity" in c}
    assert started == {0.2}


def test_near_the_boundary_only_small_tweaks() -> None:
    ctx = context(max_accuracy_drop=0.05)
    parent = measured(
        SPACE.recipe({"quant.method": "awq", "recovery.method": "lora"}), accuracy=0.76
    )
    assert OP.diagnose(parent, ctx) == "boundary"
    tweakable = {
        "quant.group_size",
        "recovery.steps",
        "recovery.lora_rank",
        "serve.max_num_seqs",
        "serve.gpu_memory_utilization",
        "serve.attention_backend",
    }
    moved: Counter[str] = Counter()
    for p, c in children(parent, ctx):
        names = changed(p, c)
        assert len(names) == 1 and names <= tweakable
        moved.update(names)
    assert set(moved) == tweakable


def test_without_measurements_it_explores_push_and_back_off() -> None:
    generator = rng(1)
    parents = samples(SPACE, 100, seed=2)
    rules = Counter(OP.propose(dict(p), "explore", generator)[1] for p in parents)
    back_off = {"raise-precision", "reduce-sparsity", "add-recovery"}
    push = {"lower-precision", "more-sparsity", "start-pruning"}
    assert back_off <= set(rules) and push <= set(rules)
    assert not {"kv-fp8", "tune-serving", "low-precision-compute"} & set(rules)


# ---------------------------------------------------------------------- robustness


def _without(prefix: str) -> SearchSpace:
    data = SPACE.to_data()
    data["genes"] = {n: g for n, g in data["genes"].items() if not n.startswith(prefix)}
    data["forbid"] = [
        rule
        for rule in data.get("forbid", [])
        if not any(n.startswith(prefix) for n in rule["when"])
    ]
    return SearchSpace.from_data(data)


@pytest.mark.parametrize("prefix", ["prune.", "recovery.", "serve."])
def test_a_space_without_some_genes_still_works(prefix: str) -> None:
    space = _without(prefix)
    op = ExpertMutation(space)
    ctx = context(space, max_accuracy_drop=0.05, max_memory_mib=8000)
    cases = [
        ({"quant.method": "awq"}, {"max_accuracy_drop": 0.1}),
        ({}, {"max_memory_mib": 0.5}),
        ({"quant.method": "nf4"}, {"max_accuracy_drop": -0.05, "max_memory_mib": -0.1}),
    ]
    for values, violations in cases:
        parent = measured(space.recipe(values), violations=violations, accuracy=0.8)
        for p, c in children(parent, ctx, op):
            assert not any(n.startswith(prefix) for n in c)
            assert changed(p, c)
    for parent_recipe in samples(space, 30, seed=4):
        for situation in SITUATIONS:
            child, _ = op.propose(dict(parent_recipe), situation, rng(5))
            assert child != parent_recipe
            assert space.recipe(child.to_dict()) == child


def test_targets_follow_the_choices_a_space_allows() -> None:
    space = SPACE.with_overrides(genes={"quant.method": {"choices": ["none", "awq"]}})
    op = ExpertMutation(space)
    ctx = context(space, max_memory_mib=8000)
    up = measured(space.recipe({"quant.method": "awq"}), "failed")
    assert {c["quant.method"] for _, c in children(up, ctx, op)} <= {"awq", "none"}
    assert any(c["quant.method"] == "none" for _, c in children(up, ctx, op))
    down = measured(space.baseline(), violations={"max_memory_mib": 0.5})
    assert any(c["quant.method"] == "awq" for _, c in children(down, ctx, op))


def test_a_space_the_rules_do_not_know_falls_back_to_one_random_gene() -> None:
    space = SearchSpace.from_data(
        {
            "genes": {
                "a.x": {"type": "choice", "choices": ["p", "q", "r"]},
                "a.y": {"type": "int", "low": 0, "high": 10},
                "a.z": {"type": "bool"},
            }
        }
    )
    op = ExpertMutation(space)
    ctx = context(space, max_accuracy_drop=0.05)
    for situation_parent in [
        measured(space.baseline(), "failed"),
        measured(space.baseline(), violations={"max_accuracy_drop": 0.1}),
        measured(space.baseline(), accuracy=0.8),
    ]:
        for seed in range(40):
            child, rule = op.propose(
                dict(space.baseline()), op.diagnose(situation_parent, ctx), rng(seed)
            )
            assert rule == "random"
            assert len(changed(space.baseline(), child)) == 1


def test_nothing_to_change_returns_the_parent() -> None:
    pinned = SPACE.with_overrides(pin={n: g.default for n, g in SPACE.genes.items()})
    op = ExpertMutation(pinned)
    parent = measured(pinned.baseline(), "failed")
    child, rule = op.propose(dict(parent.recipe), "failed", rng())
    assert (child, rule) == (pinned.baseline(), "none")
    assert op.vary([parent], rng(), context(pinned)).recipe == pinned.baseline()


seeds = st.integers(min_value=0, max_value=SEED_MAX)


@given(seed_parent=seeds, seed=seeds, situation=st.sampled_from(SITUATIONS))
def test_every_situation_gives_a_new_valid_child_deterministically(
    seed_parent: int, seed: int, situation: str
) -> None:
    parent = SPACE.sample(rng(seed_parent))
    before = parent.canonical_json()
    child, rule = OP.propose(dict(parent), situation, rng(seed))
    assert parent.canonical_json() == before
    assert child != parent
    assert SPACE.recipe(child.to_dict()) == child
    assert SPACE.violated_rule(dict(child)) is None
    assert OP.propose(dict(parent), situation, rng(seed)) == (child, rule)


def test_vary_is_deterministic_for_a_seed_and_leaves_the_parent_alone() -> None:
    ctx = context(max_accuracy_drop=0.05, max_memory_mib=8000)
    for recipe in samples(SPACE, 20, seed=8):
        parent = measured(recipe, accuracy=0.7, memory=9000)
        snapshot = (parent.recipe.canonical_json(), dict(parent.violations))
        first = OP.vary([parent], rng(11), ctx)
        assert OP.vary([parent], rng(11), ctx) == first
        assert (parent.recipe.canonical_json(), dict(parent.violations)) == snapshot


def test_a_child_the_run_has_seen_is_passed_over_for_a_new_one() -> None:
    # The engine throws a seen child away and draws again: the expert tries another value or
    # rule first, deterministically.
    ctx = context(max_accuracy_drop=0.05, max_memory_mib=8000)
    moved = 0
    for recipe in samples(SPACE, 20, seed=4):
        parent = measured(recipe, accuracy=0.7, memory=9000)
        first = OP.vary([parent], rng(5), ctx).recipe
        seen = frozenset({first.hash, recipe.hash})
        again = OP.vary([parent], rng(5), replace(ctx, seen=seen))
        assert OP.vary([parent], rng(5), replace(ctx, seen=seen)) == again
        assert again.recipe != parent.recipe
        assert SPACE.recipe(again.recipe.to_dict()) == again.recipe
        if again.recipe.hash not in seen:
            moved += 1
    assert moved == 20


def test_when_every_move_was_seen_the_expert_still_returns_a_child() -> None:
    pins = pins_except(SPACE, "serve.max_num_seqs")
    space = SPACE.with_overrides(pin=pins)
    op = ExpertMutation(space)
    parent = measured(space.baseline(), "failed")
    everything = frozenset(
        op.propose(dict(parent.recipe), "failed", rng(seed))[0].hash for seed in range(50)
    )
    child, _ = op.propose(dict(parent.recipe), "failed", rng(1), everything | {parent.recipe.hash})
    assert child != parent.recipe
    assert child.hash in everything


def test_precision_ladders_from_the_registry_are_the_hand_written_ones() -> None:
    """The ladders were a hand-written table before the method registry; derived from its
    bits they must stay the same tiers in the same order (the rng picks by position) for
    the methods of that table, whatever methods join later."""
    from evo_compress.operators.expert import _LOWER, _RAISE

    four = ("nf4", "awq", "gptq", "rtn")
    compute = ("int8_w8a8", "fp8")
    table = {"none", "int8_weight_only", *four, *compute}

    def restricted(ladders: dict[str, tuple[tuple[str, ...], ...]]) -> dict[str, Any]:
        out = {}
        for method, tiers in ladders.items():
            kept = tuple(t for t in (tuple(m for m in tier if m in table) for tier in tiers) if t)
            if method in table and kept:
                out[method] = kept
        return out

    hand_written_raise = {
        **{m: (("int8_weight_only",), compute, ("none",)) for m in four},
        **{m: (("int8_weight_only",), ("none",)) for m in compute},
        "int8_weight_only": (("none",),),
    }
    hand_written_lower = {
        "none": (("int8_weight_only",), compute, four),
        **{m: (four,) for m in ("int8_weight_only", *compute)},
    }
    assert restricted(_RAISE) == hand_written_raise
    assert restricted(_LOWER) == hand_written_lower


def test_a_task_past_its_drop_limit_is_an_accuracy_problem() -> None:
    base = SPACE.baseline()
    ctx = context(max_memory_mib=8000, **{"max_task_drop.my_mc": 0.05})
    # The mean is fine and memory is over, but one task dropped too far: recover it first.
    violations = {"max_task_drop.my_mc": 0.02, "max_memory_mib": 0.5}
    assert OP.diagnose(measured(base, violations=violations), ctx) == "accuracy"
    within = {"max_task_drop.my_mc": -0.01, "max_memory_mib": 0.5}
    assert OP.diagnose(measured(base, violations=within), ctx) == "memory"
