"""Where the report draws each node of a run's lineage: a layered layout with one column per
generation and rows ordered to cut edge crossings (the HTML figure and the PNG share it)."""

from __future__ import annotations

from collections import Counter

from evo_compress.runs.lineage import Lineage


def lineage_layout(lineage: Lineage, sweeps: int = 2) -> dict[int, tuple[float, float]]:
    """A layered layout: x is the generation, rows within a generation ordered by the mean
    row of the parents (then of the children, sweeping back and forth) to cut crossings, and
    centred on 0."""
    layers: dict[int, list[int]] = {}
    for node in sorted(lineage.nodes.values(), key=lambda n: (n.slot, n.id)):
        layers.setdefault(node.generation, []).append(node.id)
    parents: dict[int, list[int]] = {}
    children: dict[int, list[int]] = {}
    for edge in lineage.edges:
        parents.setdefault(edge.child, []).append(edge.parent)
        children.setdefault(edge.parent, []).append(edge.child)
    row: dict[int, float] = {}

    def place(generation: int) -> None:
        ids = layers[generation]
        for index, ident in enumerate(ids):
            row[ident] = index - (len(ids) - 1) / 2.0

    def reorder(generation: int, links: dict[int, list[int]]) -> None:
        def key(ident: int) -> tuple[float, float]:
            rows = [row[i] for i in links.get(ident, []) if i in row]
            return (sum(rows) / len(rows) if rows else row[ident], row[ident])

        layers[generation].sort(key=key)
        place(generation)

    generations = sorted(layers)
    for generation in generations:
        place(generation)
    for _ in range(sweeps):
        for generation in generations[1:]:
            reorder(generation, parents)
        for generation in reversed(generations[:-1]):
            reorder(generation, children)
    for generation in generations[1:]:
        reorder(generation, parents)
    return {ident: (float(lineage.nodes[ident].generation), row[ident]) for ident in row}


def widest_layer(lineage: Lineage) -> int:
    """The most lineage nodes any one generation holds (1 for an empty lineage)."""
    counts = Counter(n.generation for n in lineage.nodes.values())
    return max(counts.values(), default=1)
