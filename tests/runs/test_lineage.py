"""Lineage of a run's recipes: ancestry back to the first generation, objective deltas along
each parent link, depth limits, the LLM requests behind a child, and the DOT, GraphML and
text renderings, all read from the stores of real searches."""

from __future__ import annotations

import io
import itertools
import json
import re
import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from evo_compress_doubles.providers import (
    FakeProviderServer,
    RecordedRequest,
    Reply,
    Response,
    llm_search_sections,
    model_like,
)

from evo_compress.exceptions import EvoCompressError, RunStoreError
from evo_compress.objectives import OBJECTIVE_NAMES
from evo_compress.runs import RunStore
from evo_compress.runs.front import load_front
from evo_compress.runs.lineage import Edge, Lineage, Node, load_lineage
from evo_compress.runs.store import DB_NAME
from evo_compress.testing import run_search

GRAPHML = "{http://graphml.graphdrawing.org/xmlns}"


def raw(run_dir: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows read with sqlite3 alone, independently of the code under test."""
    db = sqlite3.connect(run_dir / DB_NAME)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def recorded(run_dir: Path) -> tuple[dict[int, tuple[int, int, list[int], list[str]]], dict]:
    individuals = {
        ident: (generation, slot, json.loads(parents), json.loads(operators))
        for ident, generation, slot, parents, operators in raw(
            run_dir, "SELECT id, generation, slot, parents, operators FROM individuals"
        )
    }
    objectives = {
        ident: json.loads(values) if values else None
        for ident, values in raw(run_dir, "SELECT individual_id, objectives FROM evaluations")
    }
    return individuals, objectives


def llm_config(config_factory: Any, server: FakeProviderServer, **llm: Any) -> Any:
    return config_factory(**llm_search_sections(server, generations=4, llm=llm))


@pytest.fixture
def plain_run(config_factory, tmp_path) -> Path:
    return run_search(config_factory(search={"generations": 5}), tmp_path / "plain")


@pytest.fixture
def llm_run(config_factory, tmp_path, monkeypatch) -> Path:
    """A search whose children come from classic and LLM operators: one reply in five is not
    JSON (re-asked), and the request budget runs out, so later LLM children fall back."""
    monkeypatch.setenv("EVO_TEST_KEY", "sk-test-lineage")
    answer = model_like()
    count = {"n": 0}

    def sometimes_garbled(request: RecordedRequest) -> Response:
        count["n"] += 1
        if count["n"] % 5 == 0:
            return Reply("this is not a recipe", 50, 5)
        return answer(request)

    with FakeProviderServer(default=sometimes_garbled) as server:
        config = llm_config(config_factory, server, budget={"max_calls": 14})
        return run_search(config, tmp_path / "llm")


def ancestry_walk(lineage: Lineage, root: int) -> set[int]:
    parents: dict[int, list[int]] = {}
    for edge in lineage.edges:
        parents.setdefault(edge.child, []).append(edge.parent)
    seen, todo = set(), [root]
    while todo:
        ident = todo.pop()
        if ident not in seen:
            seen.add(ident)
            todo.extend(parents.get(ident, []))
    return seen


def test_the_front_lineage_reaches_the_first_generation(plain_run):
    individuals, _ = recorded(plain_run)
    with RunStore.open(plain_run) as store:
        front = [m.id for m in load_front(store)]
        lineage = load_lineage(store)
    assert front and lineage.roots == front
    (archive,) = raw(
        plain_run, "SELECT algorithm_state FROM checkpoints ORDER BY generation DESC LIMIT 1"
    )
    assert {i for i, n in lineage.nodes.items() if n.on_front} == set(
        json.loads(archive[0])["archive"]
    )
    for root in front:
        reached = ancestry_walk(lineage, root)
        oldest = [i for i in reached if not lineage.parents_of(i)]
        assert oldest and all(lineage.nodes[i].generation == 0 for i in oldest)
    for ident, node in lineage.nodes.items():
        generation, slot, parents, operators = individuals[ident]
        assert (node.generation, node.slot, node.operators) == (generation, slot, operators)
        assert node.generation >= 0  # the baseline reference is never an ancestor
        assert set(lineage.parents_of(ident)) == set(parents)  # walked all the way back
        assert node.recipe and all("." not in key for key in node.recipe)  # nested form

    data = json.loads(json.dumps(lineage.to_json()))
    assert data["roots"] == front
    assert [n["id"] for n in data["nodes"]] == sorted(lineage.nodes)
    assert len(data["edges"]) == len(lineage.edges) > 0
    assert {"parent", "child", "deltas"} <= set(data["edges"][0])


def test_edge_deltas_are_child_minus_parent_of_the_stored_objectives(config_factory, tmp_path):
    # Every recipe with an fp8 KV cache fails: some children and parents have no objectives.
    config = config_factory(
        search={"generations": 4},
        evaluator={"name": "synthetic", "settings": {"fail_if": {"kv.dtype": ["fp8"]}}},
    )
    run_dir = run_search(config, tmp_path / "run")
    individuals, objectives = recorded(run_dir)
    with RunStore.open(run_dir) as store:
        everyone = [i for i, row in individuals.items() if row[0] >= 1]
        lineage = load_lineage(store, everyone)
    links = {(p, c) for c in lineage.nodes for p in individuals[c][2] if individuals[c][0] > 0}
    assert {(e.parent, e.child) for e in lineage.edges} == links
    for edge in lineage.edges:
        child, parent = objectives.get(edge.child), objectives.get(edge.parent)
        if child is None or parent is None:
            assert edge.deltas is None
        else:
            expected = {n: child[n] - parent[n] for n in OBJECTIVE_NAMES}
            assert edge.deltas == pytest.approx(expected)
    failed = [i for i, n in lineage.nodes.items() if n.status == "failed"]
    assert failed and any(e.deltas is None for e in lineage.edges)
    assert all(lineage.nodes[i].objectives is None for i in failed)
    assert all("kv.dtype" in str(lineage.nodes[i].reason) for i in failed)


def test_depth_limits_how_far_back_the_lineage_walks(plain_run):
    individuals, _ = recorded(plain_run)
    with RunStore.open(plain_run) as store:
        last = max(row[0] for row in individuals.values())
        roots = [i for i, row in individuals.items() if row[0] == last][:3]
        lineages = [load_lineage(store, roots, depth=d) for d in range(8)]
        full = load_lineage(store, roots)
    assert set(lineages[0].nodes) == set(roots)
    parents = {p for r in roots for p in individuals[r][2]}
    assert set(lineages[1].nodes) == set(roots) | parents
    for shallow, deep in itertools.pairwise(lineages):
        assert set(shallow.nodes) <= set(deep.nodes) <= set(full.nodes)
    # Generation numbers fall by at least one per parent link: `last` links reach generation 0.
    assert set(lineages[last].nodes) == set(full.nodes)
    assert min(n.generation for n in full.nodes.values()) == 0
    # Cut-off nodes still name their recorded parents.
    shallow = lineages[1]
    cut = [n for n in shallow.nodes.values() if n.id not in roots and n.generation > 0]
    assert cut and all(n.parents == individuals[n.id][2] for n in cut)
    hidden = {p for n in cut for p in n.parents if p not in shallow.nodes}
    notes = " ".join(re.findall(r"parents not shown: (.*)", shallow.to_tree()))
    assert {int(i) for i in re.findall(r"#(\d+)", notes)} == hidden


def test_a_given_individual_and_unknown_ids(plain_run):
    individuals, _ = recorded(plain_run)
    child = max(individuals)
    with RunStore.open(plain_run) as store:
        lineage = load_lineage(store, [child])
        assert lineage.roots == [child]
        assert set(lineage.parents_of(child)) == set(individuals[child][2])
        (reference,) = [i for i, row in individuals.items() if row[0] == -1]
        alone = load_lineage(store, [reference])
        assert list(alone.nodes) == [reference] and alone.edges == []
        assert alone.nodes[reference].operators == ["reference"]
        with pytest.raises(RunStoreError, match=f"has no individual {child + 100}"):
            load_lineage(store, [child, child + 100])
        with pytest.raises(EvoCompressError, match="`depth` must be >= 0, got -1"):
            load_lineage(store, [child], depth=-1)


def test_dot_is_a_well_formed_digraph(plain_run):
    with RunStore.open(plain_run) as store:
        lineage = load_lineage(store)
    dot = lineage.to_dot()
    assert dot.startswith("digraph lineage {") and dot.rstrip().endswith("}")
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', dot)
    assert '"' not in unquoted.replace('""', "")  # every string closed
    assert unquoted.count("{") == unquoted.count("}") == 1
    declared = set(re.findall(r"^\s*(n\d+) \[", dot, re.M))
    edges = re.findall(r"^\s*(n\d+) -> (n\d+)", dot, re.M)
    assert declared == {f"n{i}" for i in lineage.nodes}
    assert len(edges) == len(lineage.edges)
    assert {n for edge in edges for n in edge} <= declared
    for ident, node in lineage.nodes.items():
        line = next(x for x in dot.splitlines() if x.strip().startswith(f"n{ident} ["))
        assert f'label="#{ident} g{node.generation}\\n' in line
        assert ("filled" in line) == node.on_front


def test_graphml_parses_and_carries_nodes_edges_and_deltas(plain_run):
    with RunStore.open(plain_run) as store:
        lineage = load_lineage(store)
    root = ET.fromstring(lineage.to_graphml())
    assert root.tag == f"{GRAPHML}graphml"
    keys = {k.get("id"): k.get("for") for k in root.iter(f"{GRAPHML}key")}
    assert {"generation", "operators", "status", "on_front", *OBJECTIVE_NAMES} <= set(keys)
    assert {f"delta_{n}" for n in OBJECTIVE_NAMES} <= {k for k, f in keys.items() if f == "edge"}
    nodes = {n.get("id"): n for n in root.iter(f"{GRAPHML}node")}
    assert set(nodes) == {f"n{i}" for i in lineage.nodes}
    for ident, node in lineage.nodes.items():
        data = {d.get("key"): d.text or "" for d in nodes[f"n{ident}"]}
        assert set(data) <= set(keys)
        assert int(data["generation"]) == node.generation
        assert data["on_front"] == ("true" if node.on_front else "false")
        assert node.objectives is not None
        assert float(data["accuracy"]) == node.objectives["accuracy"]
    edges = list(root.iter(f"{GRAPHML}edge"))
    assert len(edges) == len(lineage.edges)
    for element, edge in zip(edges, lineage.edges, strict=True):
        assert (element.get("source"), element.get("target")) == (
            f"n{edge.parent}",
            f"n{edge.child}",
        )
        deltas = {d.get("key"): float(d.text or "nan") for d in element}
        assert edge.deltas is not None
        assert deltas == pytest.approx({f"delta_{k}": v for k, v in edge.deltas.items()})
    networkx = pytest.importorskip("networkx")
    graph = networkx.read_graphml(io.BytesIO(lineage.to_graphml().encode()))
    assert graph.number_of_nodes() == len(lineage.nodes)
    assert graph.number_of_edges() == len({(e.parent, e.child) for e in lineage.edges})


def test_renderings_escape_whatever_a_record_holds():
    nasty = 'say "hi" \\ {braces} <tag> & \x00\x1b\nnext line'
    node = Node(
        id=1,
        generation=1,
        slot=0,
        hash="h",
        recipe={},
        operators=['odd"label', "fallback:x"],
        status="failed",
        objectives=None,
        reason=nasty,
        on_front=False,
        llm=[],
        parents=[2],
    )
    parent = Node(
        id=2,
        generation=0,
        slot=0,
        hash="g",
        recipe={},
        operators=["random"],
        status="ok",
        objectives=dict.fromkeys(OBJECTIVE_NAMES, 1.0),
        reason=None,
        on_front=True,
        llm=[],
    )
    lineage = Lineage([1], {1: node, 2: parent}, [Edge(2, 1, None)])
    root = ET.fromstring(lineage.to_graphml())
    reason = next(d.text for d in root.iter(f"{GRAPHML}data") if d.get("key") == "reason")
    assert reason is not None and '"hi" \\ {braces} <tag> &' in reason
    dot = lineage.to_dot()
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', dot)
    assert unquoted.count("{") == unquoted.count("}") == 1 and "\x00" not in dot
    tree = lineage.to_tree()
    assert tree.startswith("#1 g1") and "failed: say" in tree and "#2 g0" in tree


def test_the_tree_shows_every_root_once_per_block_with_shared_ancestors(plain_run):
    with RunStore.open(plain_run) as store:
        lineage = load_lineage(store)
    text = lineage.to_tree()
    blocks = text.strip("\n").split("\n\n")
    assert len(blocks) == len(lineage.roots)
    for root, block in zip(lineage.roots, blocks, strict=True):
        lines = block.splitlines()
        assert lines[0].startswith(f"#{root} g{lineage.nodes[root].generation} [")
        printed = [int(m) for m in re.findall(r"#(\d+) g-?\d+ \[", block)]
        assert len(printed) == len(set(printed))  # expanded once per root
        assert set(printed) == ancestry_walk(lineage, root)
        for ident in re.findall(r"#(\d+) \(see above\)", block):
            assert int(ident) in printed
        assert "acc " in lines[0] and "lat " in lines[0] and " ms" in lines[0]
    assert "(see above)" in text  # crossovers of relatives share ancestors


def test_llm_children_carry_their_requests(llm_run):
    individuals, _ = recorded(llm_run)
    calls = raw(
        llm_run,
        "SELECT generation, slot, operator, attempt, provider, model, outcome, rationale, "
        "input_tokens FROM llm_calls",
    )
    by_key: dict[tuple[int, int, str], list[tuple[Any, ...]]] = {}
    for call in calls:
        by_key.setdefault(call[:3], []).append(call)
    llm_labels = {c[2] for c in calls} - {"llm-seed"}
    with RunStore.open(llm_run) as store:
        lineage = load_lineage(store, list(individuals))
        # A screened generation's LLM child may sit in another slot than its request's.
        request_slots = store.request_slots()
    seeds = [n for n in lineage.nodes.values() if n.operators == ["llm-seed"]]
    assert seeds
    for seed in seeds:
        assert [c["role"] for c in seed.llm] and {c["role"] for c in seed.llm} == {"seed"}
        assert {c["provider"] for c in seed.llm} == {"google"}
    made_by_llm = fell_back = 0
    for node in lineage.nodes.values():
        if node.generation < 1:
            continue
        labels = [op for op in node.operators if op in llm_labels]
        slot = request_slots.get(node.id, node.slot)
        expected = sorted(
            (c for label in labels for c in by_key.get((node.generation, slot, label), [])),
            key=lambda c: (c[2], c[3]),
        )
        columns = ("operator", "attempt", "provider", "model", "outcome", "rationale")
        got = [
            (node.generation, slot, *(c[k] for k in columns), c["input_tokens"]) for c in node.llm
        ]
        assert got == expected
        if labels and not node.fell_back:
            made_by_llm += 1
            assert node.llm[-1]["outcome"] == "valid" and node.rationale
            assert node.llm[-1]["model"] == f"{node.llm[-1]['provider']}-model"
        fell_back += node.fell_back
    assert made_by_llm and fell_back  # both kinds are in this run
    assert any(c["outcome"] == "invalid" for n in lineage.nodes.values() for c in n.llm)


def test_the_tree_quotes_the_llm_rationale_of_a_child_it_made(llm_run):
    with RunStore.open(llm_run) as store:
        nodes = load_lineage(store, [r.id for r in store.individuals()]).nodes
        made = next(
            n for n in nodes.values() if n.generation >= 1 and n.rationale and not n.fell_back
        )
        lineage = load_lineage(store, [made.id])
    (stored,) = raw(
        llm_run,
        "SELECT provider, rationale FROM llm_calls WHERE generation = ? AND slot = ? "
        "AND outcome = 'valid' AND operator IN (SELECT value FROM json_each(?))",
        made.generation,
        made.slot,
        json.dumps(made.operators),
    )
    lines = lineage.to_tree().splitlines()
    assert lines[0].startswith(f"#{made.id} g{made.generation} [")
    assert lines[1].strip("│ ") == f"LLM {stored[0]}/{stored[0]}-model: {stored[1]}"
    graph = ET.fromstring(lineage.to_graphml())
    rationale = {d.text for d in graph.iter(f"{GRAPHML}data") if d.get("key") == "llm_rationale"}
    assert stored[1] in rationale


def test_a_run_killed_mid_generation_has_unevaluated_nodes(plain_run):
    individuals, _ = recorded(plain_run)
    last = max(individuals)
    db = sqlite3.connect(plain_run / DB_NAME)
    with db:
        db.execute("DELETE FROM evaluations WHERE individual_id = ?", (last,))
    db.close()
    with RunStore.open(plain_run) as store:
        lineage = load_lineage(store, [last])
    node = lineage.nodes[last]
    assert node.status is None and node.objectives is None
    assert all(e.deltas is None for e in lineage.edges if e.child == last)
    assert "not evaluated" in lineage.to_tree().splitlines()[0]
    assert "dotted" in lineage.to_dot()
