"""The ancestry of a run's recipes: which parents and operators made each one, what every step
gained or lost, and what the LLM said when it made one; as JSON, Graphviz DOT, GraphML or text.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from evo_compress.exceptions import EvoCompressError, RunStoreError
from evo_compress.genomes import nest
from evo_compress.objectives import OBJECTIVE_NAMES, OBJECTIVES
from evo_compress.runs.front import load_front
from evo_compress.runs.store import LLMCallRow, RunStore
from evo_compress.text import clip, terminal_safe

SEED_LABEL = "llm-seed"
FALLBACK_PREFIX = "fallback:"
SEED_SLOT = -1  # the slot of the first generation's seeding request
RATIONALE_WIDTH = 120

# Short names and units in DOT labels and tree lines, in canonical objective order.
_SHORT = {"accuracy": "acc", "latency": "lat", "memory": "mem", "energy": "energy", "co2": "co2"}
_UNITS = {"accuracy": "", "latency": "ms", "memory": "MiB", "energy": "J/1k", "co2": "g/1k"}

# What XML 1.0 cannot hold at all, even escaped (an LLM's rationale may contain anything).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_GRAPHML_NS = "http://graphml.graphdrawing.org/xmlns"


@dataclass(frozen=True)
class Node:
    """One individual of the run, with its evaluation and the LLM requests that made it."""

    id: int
    generation: int  # -1: the baseline reference, 0: the initial population
    slot: int
    hash: str
    recipe: dict[str, Any]  # nested form
    operators: list[str]  # as recorded; `fallback:NAME` when an LLM operator fell back
    status: str | None  # ok | failed | infeasible; None: never evaluated (a killed run)
    objectives: dict[str, float] | None
    reason: str | None
    on_front: bool  # in the archive of the run's last checkpoint
    # The LLM requests that made it, in attempt order (see ``_llm_requests``).
    llm: list[dict[str, Any]]
    # Its recorded parents, including any left out of the lineage by ``depth``.
    parents: list[int] = field(default_factory=list)

    @property
    def fell_back(self) -> bool:
        return any(op.startswith(FALLBACK_PREFIX) for op in self.operators)

    @property
    def made_by(self) -> dict[str, Any] | None:
        """The LLM request whose valid reply is this node (None unless an LLM made it)."""
        if self.fell_back:
            return None
        return next((c for c in reversed(self.llm) if c["outcome"] == "valid"), None)

    @property
    def rationale(self) -> str | None:
        """What the LLM said about the child it made."""
        call = self.made_by
        return str(call["rationale"]) if call is not None and call["rationale"] else None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "generation": self.generation,
            "slot": self.slot,
            "hash": self.hash,
            "recipe": self.recipe,
            "operators": list(self.operators),
            "parents": list(self.parents),
            "status": self.status,
            "objectives": self.objectives,
            "reason": self.reason,
            "on_front": self.on_front,
            "llm": [dict(call) for call in self.llm],
        }


@dataclass(frozen=True)
class Edge:
    """``parent`` is a recorded parent of ``child``."""

    parent: int
    child: int
    deltas: dict[str, float] | None  # child minus parent per objective

    def to_json(self) -> dict[str, Any]:
        return {"parent": self.parent, "child": self.child, "deltas": self.deltas}


@dataclass(frozen=True)
class Lineage:
    """The ancestry of ``roots``: every node reached by walking parent links back from them."""

    roots: list[int]
    nodes: dict[int, Node]
    edges: list[Edge]  # every recorded parent link between two nodes of the lineage
    # Recorded parents the run store does not hold (it is damaged): named, never drawn.
    absent: list[int] = field(default_factory=list)

    def parents_of(self, ident: int) -> list[int]:
        return [e.parent for e in self.edges if e.child == ident]

    def to_json(self) -> dict[str, Any]:
        return {
            "roots": list(self.roots),
            "nodes": [self.nodes[i].to_json() for i in sorted(self.nodes)],
            "edges": [e.to_json() for e in self.edges],
        }

    # ------------------------------------------------------------------ Graphviz
    def to_dot(self) -> str:
        """A Graphviz digraph, parents above children; front members bold and filled, failed
        recipes red and dashed, the requested roots double-bordered."""
        roots = set(self.roots)
        lines = [
            "digraph lineage {",
            "  rankdir=TB;",
            '  node [shape=box, fontname="Helvetica", fontsize=10];',
            '  edge [fontname="Helvetica", fontsize=9];',
        ]
        for ident in sorted(self.nodes):
            node = self.nodes[ident]
            label = "\n".join(
                (
                    f"#{node.id} g{node.generation}",
                    ", ".join(node.operators) or "-",
                    _summary(node, units=False),
                )
            )
            attrs = [f"label={_dot_string(label)}"]
            styles = []
            if node.on_front:
                styles += ["filled", "bold"]
                attrs.append('fillcolor="#cde8ff"')
            if node.status == "failed":
                styles.append("dashed")
                attrs.append('color="#c0392b"')
            elif node.status is None:
                styles.append("dotted")
            if ident in roots:
                attrs.append("peripheries=2")
            if styles:
                attrs.append(f"style={_dot_string(','.join(styles))}")
            lines.append(f"  n{ident} [{', '.join(attrs)}];")
        for edge in self.edges:
            label = ""
            if edge.deltas is not None and "accuracy" in edge.deltas:
                gain = _number("accuracy", edge.deltas["accuracy"], signed=True)
                label = f" [label={_dot_string(gain + ' acc')}]"
            lines.append(f"  n{edge.parent} -> n{edge.child}{label};")
        lines.append("}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ GraphML
    def to_graphml(self) -> str:
        """GraphML (yEd, Gephi, networkx): node data generation, slot, hash, operators, status,
        reason, each objective, on_front, root, the LLM provider/model/rationale; edge data
        the objective deltas (``delta_accuracy``, ...)."""
        root = ET.Element("graphml", {"xmlns": _GRAPHML_NS})
        node_keys: list[tuple[str, str]] = [
            ("generation", "int"),
            ("slot", "int"),
            ("hash", "string"),
            ("operators", "string"),
            ("status", "string"),
            ("reason", "string"),
            *((name, "double") for name in OBJECTIVE_NAMES),
            ("on_front", "boolean"),
            ("root", "boolean"),
            ("llm_provider", "string"),
            ("llm_model", "string"),
            ("llm_rationale", "string"),
        ]
        for name, kind in node_keys:
            ET.SubElement(
                root, "key", {"id": name, "for": "node", "attr.name": name, "attr.type": kind}
            )
        for name in OBJECTIVE_NAMES:
            key = f"delta_{name}"
            ET.SubElement(
                root, "key", {"id": key, "for": "edge", "attr.name": key, "attr.type": "double"}
            )
        graph = ET.SubElement(root, "graph", {"id": "lineage", "edgedefault": "directed"})
        roots = set(self.roots)
        for ident in sorted(self.nodes):
            node = self.nodes[ident]
            element = ET.SubElement(graph, "node", {"id": f"n{ident}"})
            values: dict[str, Any] = {
                "generation": node.generation,
                "slot": node.slot,
                "hash": node.hash,
                "operators": ", ".join(node.operators),
                "status": node.status,
                "reason": node.reason,
                **(node.objectives or {}),
                "on_front": node.on_front,
                "root": ident in roots,
            }
            made_by = node.made_by
            if made_by is not None:
                values["llm_provider"] = made_by["provider"]
                values["llm_model"] = made_by["model"]
                values["llm_rationale"] = made_by["rationale"]
            for name, _ in node_keys:
                _graphml_data(element, name, values.get(name))
        for number, edge in enumerate(self.edges):
            element = ET.SubElement(
                graph,
                "edge",
                {"id": f"e{number}", "source": f"n{edge.parent}", "target": f"n{edge.child}"},
            )
            for name, value in (edge.deltas or {}).items():
                _graphml_data(element, f"delta_{name}", value)
        ET.indent(root)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"

    # ------------------------------------------------------------------ text
    def to_tree(self) -> str:
        """For each root an indented ancestry tree: a child above its parents, each line the
        node's operators and objectives with the change from its first parent in parentheses.
        Within one root's tree a shared ancestor is expanded once, then "(see above)"."""
        parents: dict[int, list[int]] = {}
        for edge in self.edges:
            parents.setdefault(edge.child, []).append(edge.parent)
        out: list[str] = []
        for number, root in enumerate(self.roots):
            if number:
                out.append("")
            shown: set[int] = set()
            # Depth first, iteratively (a long run's ancestry can be deeper than the
            # recursion limit): (node, prefix of its own line, prefix of lines below it).
            stack: list[tuple[int, str, str]] = [(root, "", "")]
            while stack:
                ident, head, body = stack.pop()
                node = self.nodes[ident]
                if ident in shown:
                    out.append(f"{head}#{ident} (see above)")
                    continue
                shown.add(ident)
                out.append(head + self._tree_line(node, parents.get(ident, [])))
                below = parents.get(ident, [])
                extra = self._tree_notes(node, below)
                branch = "│  " if below else "   "
                out.extend(f"{body}{branch}{note}" for note in extra)
                for i in reversed(range(len(below))):
                    last = i == len(below) - 1
                    stack.append(
                        (
                            below[i],
                            body + ("└─ " if last else "├─ "),
                            body + ("   " if last else "│  "),
                        )
                    )
        return "\n".join(out) + ("\n" if out else "")

    def _tree_line(self, node: Node, parents: list[int]) -> str:
        tag = "+".join(node.operators) or "-"
        first = self.nodes.get(parents[0]) if parents else None
        base = first.objectives if first is not None else None
        text = f"#{node.id} g{node.generation} [{tag}] {_summary(node, units=True, base=base)}"
        if node.on_front:
            text += " *front*"
        return text

    def _tree_notes(self, node: Node, shown_parents: list[int]) -> list[str]:
        notes = []
        if node.status in ("failed", "infeasible") and node.reason:
            notes.append(f"{node.status}: {clip(node.reason, RATIONALE_WIDTH)}")
        call = node.made_by
        if call is not None and node.rationale is not None:
            notes.append(
                f"LLM {call['provider']}/{call['model']}: {clip(node.rationale, RATIONALE_WIDTH)}"
            )
        elif node.fell_back and node.llm:
            error = node.llm[-1]["error"]
            notes.append("LLM fell back" + (f": {clip(error, RATIONALE_WIDTH)}" if error else ""))
        hidden = [p for p in node.parents if p not in shown_parents and p not in self.absent]
        if hidden:
            notes.append("parents not shown: " + ", ".join(f"#{p}" for p in hidden))
        absent = [p for p in node.parents if p in self.absent]
        if absent:
            notes.append("parents not in the run store: " + ", ".join(f"#{p}" for p in absent))
        return [terminal_safe(note) for note in notes]  # LLM text, shown in a terminal


def load_lineage(
    store: RunStore, ids: Sequence[int] | None = None, depth: int | None = None
) -> Lineage:
    """The ancestry of ``ids`` (default: the run's final front, best accuracy first), walking
    at most ``depth`` parent links back from them (0: the roots alone; None: back to the
    first generation). Raises ``RunStoreError`` for an id the run does not have."""
    if depth is not None and depth < 0:
        raise EvoCompressError(f"`depth` must be >= 0, got {depth}")
    with store.snapshot():  # a search may be writing the run: read one moment of it
        return _load_lineage(store, ids, depth)


def _load_lineage(store: RunStore, ids: Sequence[int] | None, depth: int | None) -> Lineage:
    rows = {row.id: row for row in store.individuals()}
    if ids is None:
        roots = [member.id for member in load_front(store) if member.id in rows]
    else:
        roots = list(dict.fromkeys(int(i) for i in ids))
        for ident in roots:
            if ident not in rows:
                raise RunStoreError(f"run {store.run_dir} has no individual {ident}")

    def parents_of(ident: int) -> list[int]:
        row = rows[ident]
        if row.generation <= 0:  # the reference and the first generation have no parents
            return []
        out = []
        for parent in dict.fromkeys(row.parents):
            # A parent the store lacks (a damaged store) stays named, without a node.
            if parent not in rows or rows[parent].generation >= 0:  # the baseline never is
                out.append(parent)
        return out

    # Breadth first: a node's distance is its fewest parent links from a root.
    distance = {ident: 0 for ident in roots}
    queue = deque(roots)
    while queue:
        ident = queue.popleft()
        if depth is not None and distance[ident] >= depth:
            continue
        for parent in parents_of(ident):
            if parent in rows and parent not in distance:
                distance[parent] = distance[ident] + 1
                queue.append(parent)

    evaluations = store.evaluations()
    checkpoint = store.last_checkpoint()
    archive = set(checkpoint.algorithm_state.get("archive", [])) if checkpoint else set()
    calls: dict[tuple[int, int, str], list[LLMCallRow]] = {}
    for call in store.llm_calls():
        calls.setdefault((call.generation, call.slot, call.operator), []).append(call)
    # A screened generation's LLM child sits in another slot than the request it came from.
    request_slots = store.request_slots()

    nodes: dict[int, Node] = {}
    for ident in sorted(distance):
        row = rows[ident]
        evaluation = evaluations.get(ident)
        result = evaluation.result if evaluation is not None else None
        nodes[ident] = Node(
            id=row.id,
            generation=row.generation,
            slot=row.slot,
            hash=row.hash,
            recipe=nest(row.recipe),
            operators=list(row.operators),
            status=result.status if result is not None else None,
            objectives=dict(result.objectives) if result and result.objectives else None,
            reason=result.reason if result is not None else None,
            on_front=ident in archive,
            llm=_llm_requests(
                row.generation, request_slots.get(ident, row.slot), row.operators, calls
            ),
            parents=parents_of(ident),
        )
    edges = [
        Edge(parent, ident, _deltas(nodes[ident].objectives, nodes[parent].objectives))
        for ident in sorted(nodes)
        for parent in nodes[ident].parents
        if parent in nodes
    ]
    absent = sorted({p for node in nodes.values() for p in node.parents if p not in rows})
    return Lineage(roots=roots, nodes=nodes, edges=edges, absent=absent)


def _llm_requests(
    generation: int,
    slot: int,
    operators: Sequence[str],
    calls: dict[tuple[int, int, str], list[LLMCallRow]],
) -> list[dict[str, Any]]:
    """The requests recorded for this individual's generation, slot and operator labels; for
    an LLM-seeded first-generation recipe, the seeding request(s) it came from.

    A child whose LLM reply duplicated a recipe the run had seen is re-drawn in the same slot;
    when the re-draw picks the same LLM operator it falls back without asking, and the calls
    listed are those of the discarded duplicate (their outcome says ``valid`` while the node's
    operators say ``fallback:``)."""
    keys = []
    if generation == 0:
        if SEED_LABEL in operators:
            keys.append((0, SEED_SLOT, SEED_LABEL))
    elif generation > 0:
        keys.extend(
            (generation, slot, op) for op in operators if not op.startswith(FALLBACK_PREFIX)
        )
    out = []
    for key in keys:
        for call in sorted(calls.get(key, []), key=lambda c: c.attempt):
            out.append(
                {
                    "operator": call.operator,
                    "attempt": call.attempt,
                    "role": call.role,
                    "provider": call.provider,
                    "model": call.model,
                    "outcome": call.outcome,
                    "error": call.error,
                    "rationale": call.rationale,
                    "confidence": call.confidence,
                    "input_tokens": call.input_tokens,
                    "output_tokens": call.output_tokens,
                    "cost": call.cost,
                }
            )
    return out


def _deltas(
    child: dict[str, float] | None, parent: dict[str, float] | None
) -> dict[str, float] | None:
    if child is None or parent is None:
        return None
    return {n: child[n] - parent[n] for n in OBJECTIVE_NAMES if n in child and n in parent}


def _number(name: str, value: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if name == "accuracy":
        return f"{value:{sign}.3f}"
    size = abs(value)
    digits = 0 if size >= 100 else 1 if size >= 10 else 2
    return f"{value:{sign}.{digits}f}"


def _summary(node: Node, units: bool, base: dict[str, float] | None = None) -> str:
    """``acc=0.812 lat=3.10 ...`` (DOT) or ``acc 0.812 (+0.030) lat 3.10 ms (-0.40) ...``
    (tree, with the change from ``base``)."""
    if node.objectives is None:
        return node.status or "not evaluated"
    parts = []
    for objective in OBJECTIVES:
        name = objective.name
        if name not in node.objectives:
            continue
        value = node.objectives[name]
        text = f"{_SHORT[name]}{' ' if units else '='}{_number(name, value)}"
        if units and _UNITS[name]:
            text += f" {_UNITS[name]}"
        if base is not None and name in base:
            text += f" ({_number(name, value - base[name], signed=True)})"
        parts.append(text)
    if node.status not in (None, "ok"):
        parts.append(str(node.status))
    return " ".join(parts)


def _dot_string(text: str) -> str:
    """A DOT double-quoted string; newlines become centred line breaks."""
    text = _NOT_XML.sub("", text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text.replace("\r", "").replace("\n", "\\n") + '"'


def _graphml_data(parent: ET.Element, key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = _NOT_XML.sub("", str(value))
    ET.SubElement(parent, "data", {"key": key}).text = text
