"""How a run went, read back from its store: the per-generation history and what each operator
(classic, LLM, LLM seeding) contributed and cost, checked against the raw rows of real runs."""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from evo_compress_doubles.providers import (
    FakeProviderServer,
    RecordedRequest,
    Reply,
    Response,
    llm_search_sections,
    model_like,
)
from pymoo.indicators.hv import HV

from evo_compress.runs import RunStore
from evo_compress.runs.analysis import HISTORY_FIELDS, history, operator_stats
from evo_compress.runs.store import DB_NAME
from evo_compress.testing import run_search

SHARES = ("valid", "feasible", "dominated_parent", "entered_front")
LLM_FIELDS = ("llm_calls", "llm_valid", "input_tokens", "output_tokens")


def raw(run_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows read with sqlite3 alone, independently of the code under test."""
    db = sqlite3.connect(run_dir / DB_NAME)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def hypervolumes_in_the_last_box(run_dir: Path) -> list[float]:
    """Each checkpoint's front (its archive) in the box of the last one: the ideal and nadir
    of the last front and the baseline reference, normalised, reference point 1.1; from raw
    rows and pymoo's indicator, as README's "Objectives and hypervolume" defines it."""
    objectives = {
        ident: json.loads(text)
        for ident, text in raw(
            run_dir, "SELECT individual_id, objectives FROM evaluations WHERE status = 'ok'"
        )
    }

    def point(o: dict[str, float]) -> list[float]:
        return [-o["accuracy"], o["latency"], o["memory"], o["energy"], o["co2"]]

    fronts = [
        np.array([point(objectives[i]) for i in json.loads(state)["archive"]]).reshape(-1, 5)
        for (state,) in raw(run_dir, "SELECT algorithm_state FROM checkpoints ORDER BY generation")
    ]
    [(reference,)] = raw(
        run_dir,
        "SELECT individual_id FROM evaluations e JOIN individuals i ON i.id = "
        "e.individual_id WHERE i.generation = -1",
    )
    corners = np.vstack([fronts[-1], [point(objectives[reference])]])
    ideal, nadir = corners.min(axis=0), corners.max(axis=0)
    hv = HV(ref_point=np.full(5, 1.1))
    return [float(hv((f - ideal) / (nadir - ideal))) if len(f) else 0.0 for f in fronts]


def children_by_label(run_dir: Path) -> dict[str, list[tuple[int, bool]]]:
    """Label -> (child id, fell back) for every child of generation 1 on, from the
    individuals' operators alone: ``[llm, fallback:x]`` is a child of ``llm`` that fell back."""
    out: dict[str, list[tuple[int, bool]]] = {}
    for ident, operators in raw(
        run_dir, "SELECT id, operators FROM individuals WHERE generation >= 1"
    ):
        ops = json.loads(operators)
        for i, op in enumerate(ops):
            if op.startswith("fallback:"):
                continue
            fell_back = i + 1 < len(ops) and ops[i + 1].startswith("fallback:")
            out.setdefault(op, []).append((ident, fell_back))
    return out


def statuses(run_dir: Path) -> dict[int, str]:
    return dict(raw(run_dir, "SELECT individual_id, status FROM evaluations"))


def check_shares(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        for name in SHARES:
            value = row[name]
            assert value is None or (isinstance(value, float) and 0.0 <= value <= 1.0), row
            if row["children"] == 0:
                assert value is None


@pytest.fixture
def plain_run(config_factory, tmp_path) -> Path:
    # Every recipe with an fp8 KV cache fails: `valid` is below 1 for some operator.
    config = config_factory(
        search={"generations": 5},
        evaluator={"name": "synthetic", "settings": {"fail_if": {"kv.dtype": ["fp8"]}}},
    )
    return run_search(config, tmp_path / "plain")


@pytest.fixture
def llm_run(config_factory, tmp_path, monkeypatch) -> Path:
    """Classic and LLM operators, the crossover priced; one reply in five is not JSON and the
    request budget runs out, so some LLM children fall back."""
    monkeypatch.setenv("EVO_TEST_KEY", "sk-test-analysis")
    answer = model_like()
    count = {"n": 0}

    def sometimes_garbled(request: RecordedRequest) -> Response:
        count["n"] += 1
        if count["n"] % 5 == 0:
            return Reply("this is not a recipe", 50, 5)
        return answer(request)

    with FakeProviderServer(default=sometimes_garbled) as server:
        price = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}
        sections = llm_search_sections(
            server, 4, crossover_extra={"price": price}, llm={"budget": {"max_calls": 14}}
        )
        return run_search(config_factory(**sections), tmp_path / "llm")


def test_history_is_the_checkpoints_stats_in_order(plain_run):
    with RunStore.open(plain_run) as store:
        rows = history(store)
    stored = raw(plain_run, "SELECT generation, stats FROM checkpoints ORDER BY generation")
    assert [r["generation"] for r in rows] == [g for g, _ in stored] == list(range(5))
    expected_hv = hypervolumes_in_the_last_box(plain_run)
    for row, (generation, stats) in zip(rows, stored, strict=True):
        stats = json.loads(stats)
        assert list(row) == list(HISTORY_FIELDS)
        assert {k: v for k, v in row.items() if k != "hypervolume"} == {
            name: stats[name] for name in HISTORY_FIELDS if name != "hypervolume"
        }
        assert row["generation"] == generation
        assert row["hypervolume"] == pytest.approx(expected_hv[generation], rel=1e-12)
    # The last generation's box is the one its checkpoint measured in.
    assert rows[-1]["hypervolume"] == pytest.approx(json.loads(stored[-1][1])["hypervolume"])
    assert all(a <= b for a, b in itertools.pairwise(expected_hv))
    evaluated = raw(
        plain_run,
        "SELECT 1 FROM evaluations e JOIN individuals i ON i.id = e.individual_id "
        "WHERE i.generation >= 0",
    )
    assert rows[-1]["evaluations_total"] == len(evaluated)
    assert sum(r["failed"] for r in rows) > 0


def test_operator_stats_of_a_classic_run(plain_run):
    with RunStore.open(plain_run) as store:
        rows = operator_stats(store)
    expected = children_by_label(plain_run)
    status = statuses(plain_run)
    credits = {
        ident: (feasible, dominated, entered, hv)
        for ident, feasible, dominated, entered, hv in raw(
            plain_run,
            "SELECT individual_id, feasible, dominated_parent, entered_front, hv_contribution "
            "FROM credits",
        )
    }
    assert [r["operator"] for r in rows] == sorted(expected) == ["gene", "uniform"]
    check_shares(rows)
    for row in rows:
        mine = [ident for ident, _ in expected[row["operator"]]]
        assert row["children"] == len(mine)
        assert row["fallbacks"] == 0
        assert row["valid"] == pytest.approx(sum(status[i] == "ok" for i in mine) / len(mine))
        for column, name in enumerate(("feasible", "dominated_parent", "entered_front")):
            share = sum(credits[i][column] for i in mine) / len(mine)
            assert row[name] == pytest.approx(share)
        hv = [credits[i][3] for i in mine if credits[i][3] is not None]
        assert row["hv_contribution"] == (pytest.approx(sum(hv)) if hv else None)
        assert all(row[name] is None for name in (*LLM_FIELDS, "cost"))
        assert row["tokens_per_evaluated_child"] is None is row["cost_per_evaluated_child"]
        assert row["evaluated"] == sum(1 for i in mine if i in status)
    # Children made by crossover then mutation count for both.
    both = sum(1 for children in expected.values() for _ in children)
    assert sum(r["children"] for r in rows) == both
    assert any(r["valid"] < 1 for r in rows)


def test_without_credit_rows_the_individuals_operators_count(plain_run):
    with RunStore.open(plain_run) as store:
        credited = operator_stats(store)
    db = sqlite3.connect(plain_run / DB_NAME)
    with db:
        db.execute("DELETE FROM credits")
    db.close()
    with RunStore.open(plain_run) as store:
        uncredited = operator_stats(store)
    keep = ("operator", "children", "valid", "fallbacks")
    assert [{k: r[k] for k in keep} for r in uncredited] == [
        {k: r[k] for k in keep} for r in credited
    ]
    assert all(r["feasible"] is None and r["hv_contribution"] is None for r in uncredited)


def test_operator_stats_of_a_run_with_llm_operators(llm_run):
    with RunStore.open(llm_run) as store:
        rows = {r["operator"]: r for r in operator_stats(store)}
    expected = children_by_label(llm_run)
    status = statuses(llm_run)
    calls = raw(
        llm_run, "SELECT operator, outcome, input_tokens, output_tokens, cost FROM llm_calls"
    )
    llm_labels = {c[0] for c in calls}
    assert set(rows) == set(expected) | llm_labels
    assert {"crossover:llm", "local", "llm-seed"} <= llm_labels
    check_shares(list(rows.values()))
    for label, children in expected.items():
        row = rows[label]
        assert row["children"] == len(children)
        assert row["fallbacks"] == sum(fell for _, fell in children)
    assert rows["crossover:llm"]["fallbacks"] + rows["local"]["fallbacks"] > 0
    for label in llm_labels:
        row = rows[label]
        mine = [c for c in calls if c[0] == label]
        assert row["llm_calls"] == len(mine)
        assert row["llm_valid"] == sum(c[1] == "valid" for c in mine)
        assert row["input_tokens"] == sum(c[2] for c in mine)
        assert row["output_tokens"] == sum(c[3] for c in mine)
        costs = [c[4] for c in mine if c[4] is not None]
        assert row["cost"] == (pytest.approx(sum(costs)) if costs else None)
        # what an evaluated child of the operator cost, its fallbacks included
        evaluated = sum(1 for i, _ in expected.get(label, []) if i in status)
        if label == "llm-seed":
            evaluated = row["evaluated"]  # checked below
        assert row["evaluated"] == evaluated
        if evaluated:
            tokens = sum(c[2] + c[3] for c in mine)
            assert row["tokens_per_evaluated_child"] == pytest.approx(tokens / evaluated)
            per_child = pytest.approx(sum(costs) / evaluated) if costs else None
            assert row["cost_per_evaluated_child"] == per_child
    assert rows["crossover:llm"]["cost"] > 0 and rows["local"]["cost"] is None
    assert any(r["llm_valid"] < r["llm_calls"] for r in rows.values() if r["llm_calls"])
    for label in set(expected) - llm_labels:
        assert rows[label]["llm_calls"] is None  # classic operators

    # LLM seeding: the first generation's recipes the LLM proposed, judged by checkpoint 0.
    seeds = [
        ident
        for ident, operators in raw(
            llm_run, "SELECT id, operators FROM individuals WHERE generation = 0"
        )
        if "llm-seed" in json.loads(operators)
    ]
    seed = rows["llm-seed"]
    assert seeds and seed["children"] == len(seeds)
    assert seed["evaluated"] == sum(i in status for i in seeds)
    assert seed["valid"] == pytest.approx(sum(status[i] == "ok" for i in seeds) / len(seeds))
    ((population, state),) = raw(
        llm_run, "SELECT population, algorithm_state FROM checkpoints WHERE generation = 0"
    )
    cv = {e["id"]: e["cv"] for e in json.loads(population)}
    archive = set(json.loads(state)["archive"])
    assert seed["feasible"] == pytest.approx(sum(cv[i] <= 0 for i in seeds) / len(seeds))
    assert seed["entered_front"] == pytest.approx(len(archive & set(seeds)) / len(seeds))
    assert seed["dominated_parent"] is None and seed["hv_contribution"] is None
