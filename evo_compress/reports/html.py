"""One self-contained HTML report of a run: the front, its progress, its lineage and what each
operator contributed, with plotly.js inline so that the file opens offline and fetches nothing.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import html
import json
import math
import textwrap
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from evo_compress.exceptions import EvoCompressError
from evo_compress.fitness.noise import AccuracyEstimate
from evo_compress.genomes import render_recipe, render_recipe_yaml
from evo_compress.objectives import OBJECTIVES
from evo_compress.runs.analysis import history, operator_stats
from evo_compress.runs.front import FrontMember, front_tasks, load_front, run_status
from evo_compress.runs.lineage import Lineage, Node, load_lineage
from evo_compress.runs.store import RunStore

REPORT_NAME = "report.html"
# The plot divs, in page order; the page sets ``body[data-rendered]`` once each is drawn.
PLOT_IDS = ("front-matrix", "front-parallel", "history", "lineage", "operators")
# Drawn in SVG (plotly ``scatter``), not WebGL (``splom``, ``parcoords``, ``scattergl``): the
# front must show in a browser without WebGL (headless, remote desktops, previews).
FRONT_PLOT_IDS = PLOT_IDS[:2]
# Evaluated recipes drawn behind the front at most: a long run's page stays small and quick.
MAX_EVALUATED_POINTS = 1000
SYNTHETIC_HOW = "synthetic (computed, not measured)"
SHARES = (
    ("valid", "valid"),
    ("feasible", "feasible"),
    ("dominated_parent", "dominated a parent"),
    ("entered_front", "entered the front"),
)
# Gene groups in the order a compression pipeline applies them; others follow by name.
_HOVER_WIDTH = 80
_HOVER_CLIP = 600
_COLORSCALE = "Viridis"
_FRONT_COLOR = "#d62728"
_ANCESTOR_COLOR = "#9aa5b1"
_EVALUATED_COLOR = "rgba(154, 165, 177, 0.45)"

# No request of any kind may leave the page (default-src 'none'), and only two scripts may run,
# by hash: the page's own script and plotly.js, which it unpacks: nothing that slipped into the
# data could execute.
# No 'unsafe-eval': these plots draw without it (checked with plotly.js 2.35 and 4.1).
# 'unsafe-inline' styles: plotly.js injects its own <style> elements. img-src: the modebar's
# "download plot as png" renders through data:/blob: images.
_CSP = (
    "default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
    "img-src data: blob:; base-uri 'none'; form-action 'none'"
)


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows, read out of a run store once (the HTML and PNGs share it)."""

    status: dict[str, Any]  # ``run_status``
    evaluator: str
    model: str | None
    created_at: float | None
    config_yaml: str
    front: list[FrontMember]
    history: list[dict[str, Any]]
    operators: list[dict[str, Any]]
    lineage: Lineage
    positions: dict[int, tuple[float, float]]  # lineage node id -> (generation, row)
    # Every other recipe evaluated with objectives (id, generation, objectives), by id.
    evaluated: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)

    @property
    def front_feasible(self) -> bool:
        return all(m.feasible for m in self.front)


def collect(store: RunStore) -> ReportData:
    """Read what a report shows from ``store``."""
    with store.snapshot():  # a search may be writing the run: read one moment of it
        return _collect(store)


def _collect(store: RunStore) -> ReportData:
    config_yaml = str(store.get_meta("config", ""))
    try:
        config = yaml.safe_load(config_yaml)
    except yaml.YAMLError:
        config = None
    config = config if isinstance(config, Mapping) else {}
    front = load_front(store)
    evaluator = _get(config, "evaluator", "name")
    if evaluator is None and front:
        evaluator = front[0].how.get("evaluator")
    lineage = load_lineage(store)
    created = store.get_meta("created_at", None)
    model = _get(config, "model", "id")
    on_front = {m.id for m in front}
    evaluated = [p for p in store.evaluated_objectives() if p[0] not in on_front]
    return ReportData(
        status=run_status(store),
        evaluator=str(evaluator or "unknown"),
        model=str(model) if model else None,
        created_at=float(created) if isinstance(created, int | float) else None,
        config_yaml=config_yaml,
        front=front,
        history=history(store),
        operators=operator_stats(store),
        lineage=lineage,
        positions=lineage_layout(lineage),
        evaluated=evaluated,
    )


def write_report(store: RunStore, out: Path) -> Path:
    """Write the run's report to ``out`` (a file, or a directory to hold ``report.html``) as
    one HTML file that opens offline; returns its path."""
    out = Path(out)
    if out.is_dir():
        out = out / REPORT_NAME
    text = render_html(collect(store), plotly_js())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(out)
    except OSError as exc:
        raise EvoCompressError(f"cannot write the report to {out}: {exc.strerror}") from None
    return out


def plotly_js() -> str:
    """The plotly.js bundle the ``plotly`` package ships (no network needed)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise EvoCompressError(
            "the HTML report needs the `plotly` package, which carries plotly.js: "
            "pip install plotly"
        ) from None
    return str(get_plotlyjs())


# ---------------------------------------------------------------------- text helpers
def how_text(metadata: Mapping[str, Any], objective: str) -> str:
    """How one objective value was obtained, from the evaluation metadata: ``measured: ...``,
    ``estimated: ...`` or that the synthetic evaluator computed it."""
    details = metadata.get("objectives")
    detail = details.get(objective) if isinstance(details, Mapping) else None
    if metadata.get("synthetic") is True or (
        isinstance(detail, Mapping) and detail.get("how") == "synthetic"
    ):
        return SYNTHETIC_HOW
    if not isinstance(detail, Mapping):
        return str(detail) if detail else "not recorded"
    text = " ".join(str(detail.get("how") or "").split())
    measured = detail.get("measured")
    if measured is True:
        return f"measured: {text}" if text else "measured"
    if measured is False:
        if text.lower().startswith("estimated"):
            return text
        return f"estimated: {text}" if text else "estimated"
    return text or "not recorded"


def format_value(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        size = abs(value)
        if size >= 1000:
            return f"{value:,.0f}"
        if size >= 10:
            return f"{value:.1f}"
        if size >= 1e-3 or value == 0:
            return f"{value:.{digits}f}"
        return f"{value:.3g}"
    return str(value)


def format_share(value: Any) -> str:
    return "-" if value is None else f"{100.0 * float(value):.0f}%"


def objective_label(objective: Any) -> str:
    arrow = "↑" if objective.direction == "max" else "↓"
    return f"{objective.name} ({objective.unit}) {arrow}"


def node_rationale(node: Node) -> tuple[str, str] | None:
    """``(provider/model, rationale)`` of the LLM request that made ``node``, if one did."""
    rationale = node.rationale
    if rationale is None:
        return None
    call = next(
        (c for c in reversed(node.llm) if c.get("outcome") == "valid" and c.get("rationale")),
        node.llm[-1] if node.llm else {},
    )
    return f"{call.get('provider', '?')}/{call.get('model', '?')}", rationale


# ---------------------------------------------------------------------- lineage layout
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


def sample_evaluated(
    points: Sequence[tuple[int, int, dict[str, float]]], limit: int = MAX_EVALUATED_POINTS
) -> list[tuple[int, int, dict[str, float]]]:
    """At most ``limit`` of ``points``, evenly spaced by id (so every stage of the search shows)
    and the same on every call: two reports of one run draw the same points."""
    if len(points) <= limit:
        return list(points)
    return [points[k * len(points) // limit] for k in range(limit)]


def widest_layer(lineage: Lineage) -> int:
    """The most lineage nodes any one generation holds (1 for an empty lineage)."""
    counts = Counter(n.generation for n in lineage.nodes.values())
    return max(counts.values(), default=1)


# ---------------------------------------------------------------------- figures
def figures(data: ReportData) -> list[dict[str, Any]]:
    """The plotly figures (``{"div", "data", "layout"}``), only those with something to show.
    Every string from the run is HTML-escaped here: plotly.js reads a subset of HTML in text."""
    out = []
    if data.front:
        out += [_scatter_matrix(data), _parallel_coordinates(data)]
    if data.history:
        out.append(_history(data))
    if data.lineage.nodes:
        out.append(_lineage(data))
    if data.operators:
        out.append(_operators(data))
    return out


def _scatter_matrix(data: ReportData) -> dict[str, Any]:
    """Every pair of objectives in its own panel (the lower triangle), front members over the
    other evaluated recipes. Each column of values is written once under ``columns`` and the
    page's script hands it to every panel that uses it (see ``_APP``)."""
    front = data.front
    shown = sample_evaluated(data.evaluated)
    title = "The front in five objectives (colour: generation found"
    title += ")" if data.front_feasible else "; no feasible recipe yet: the least-violating shown)"
    if shown:
        grey = f"{len(shown):,} other evaluated recipes"
        if len(shown) < len(data.evaluated):
            grey = f"{len(shown):,} of the {len(data.evaluated):,} other evaluated recipes"
            grey += ", sampled evenly by id"
        title += f"<br><sup>grey: {grey}</sup>"
    columns: dict[str, list[Any]] = {
        "front.text": [_member_hover(m) for m in front],
        "front.generation": [m.generation for m in front],
        "evaluated.id": [p[0] for p in shown],
    }
    for o in OBJECTIVES:
        columns[f"front.{o.name}"] = [m.objectives[o.name] for m in front]
        columns[f"evaluated.{o.name}"] = [_round(p[2][o.name]) for p in shown]
    n = len(OBJECTIVES) - 1  # rows: objectives 1..4 (y); columns: objectives 0..3 (x)
    gap = 0.02
    layout: dict[str, Any] = {
        "title": {"text": title},
        "height": 900,
        "hovermode": "closest",
        "showlegend": True,
        "legend": {"orientation": "h", "x": 1.0, "xanchor": "right", "y": 1.0},
        "margin": {"l": 90, "r": 30, "t": 90, "b": 80},
    }
    traces: list[dict[str, Any]] = []
    panel = 0
    for row in range(n):
        y_objective = OBJECTIVES[row + 1]
        for col in range(row + 1):
            x_objective = OBJECTIVES[col]
            panel += 1
            suffix = "" if panel == 1 else str(panel)
            # The first panel of a column (on the diagonal) and of a row own the ranges.
            col_owner = col * (col + 1) // 2 + col + 1
            row_owner = row * (row + 1) // 2 + 1
            layout[f"xaxis{suffix}"] = {
                "domain": [col / n + gap, (col + 1) / n - gap],
                "anchor": f"y{suffix}",
                "showticklabels": row == n - 1,
                "title": {"text": objective_label(x_objective) if row == n - 1 else ""},
                **({} if panel == col_owner else {"matches": f"x{_axis(col_owner)}"}),
            }
            layout[f"yaxis{suffix}"] = {
                "domain": [1 - (row + 1) / n + gap, 1 - row / n - gap],
                "anchor": f"x{suffix}",
                "showticklabels": col == 0,
                "title": {"text": objective_label(y_objective) if col == 0 else ""},
                **({} if panel == row_owner else {"matches": f"y{_axis(row_owner)}"}),
            }
            axes = {"xaxis": f"x{suffix}", "yaxis": f"y{suffix}"}
            if shown:
                traces.append(
                    {
                        "type": "scatter",
                        "mode": "markers",
                        "name": "other evaluated recipes",
                        "legendgroup": "evaluated",
                        "showlegend": panel == 1,
                        **axes,
                        "columns": {
                            "x": f"evaluated.{x_objective.name}",
                            "y": f"evaluated.{y_objective.name}",
                            "customdata": "evaluated.id",
                        },
                        "hovertemplate": f"#%{{customdata}}<br>{x_objective.name} %{{x}}<br>"
                        f"{y_objective.name} %{{y}}<extra>evaluated</extra>",
                        "marker": {"size": 4, "color": _EVALUATED_COLOR},
                    }
                )
            traces.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "name": "front",
                    "legendgroup": "front",
                    "showlegend": panel == 1,
                    # The trace's class in the drawn SVG (``trace<uid>``): a test counts its
                    # points.
                    "uid": f"front{panel}",
                    **axes,
                    "columns": {
                        "x": f"front.{x_objective.name}",
                        "y": f"front.{y_objective.name}",
                        "text": "front.text",
                        "marker.color": "front.generation",
                    },
                    "hovertemplate": "%{text}<extra></extra>",
                    "marker": {
                        "colorscale": _COLORSCALE,
                        "showscale": panel == 1,
                        "colorbar": _colorbar(front) | {"len": 0.5, "y": 0.75},
                        "symbol": "circle" if data.front_feasible else "x",
                        # No outline: a style less on each of ten thousand points.
                        "size": 8,
                    },
                }
            )
    return {"div": "front-matrix", "data": traces, "layout": layout, "columns": columns}


def _axis(panel: int) -> str:
    return "" if panel == 1 else str(panel)


def _round(value: float) -> float:
    """Six significant digits: as many as a point in a plot shows, and a small page."""
    return float(f"{value:.6g}")


def _parallel_coordinates(data: ReportData) -> dict[str, Any]:
    """One SVG line per front member over the objectives, each axis scaled to the front's range
    and oriented better-up; each axis's best and worst values are written at its ends. Hover
    a vertex for the member and that value (the scatter matrix shows its recipe)."""
    from plotly.colors import sample_colorscale

    front = data.front
    gens = [m.generation for m in front]
    low_gen, high_gen = min(gens), max(gens)
    shares = [0.5 if high_gen == low_gen else (g - low_gen) / (high_gen - low_gen) for g in gens]
    colors = sample_colorscale(_COLORSCALE, shares)
    bounds = {}
    for o in OBJECTIVES:
        values = [m.objectives[o.name] for m in front]
        bounds[o.name] = (min(values), max(values))
    xs = list(range(len(OBJECTIVES)))
    # One trace per generation, its members' lines apart (a gap between them): plotly draws
    # each as its own path, and a thousand-member front is tens of traces, not a thousand
    # (which take seconds to draw).
    lines: dict[int, dict[str, Any]] = {}
    for member, color in zip(front, colors, strict=True):
        trace = lines.setdefault(
            member.generation,
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"generation {member.generation}",
                "x": [],
                "y": [],
                "text": [],
                "line": {"color": color, "width": 1.6},
                "opacity": 0.85,
                "hovertemplate": "%{text}<extra></extra>",
                "showlegend": False,
            },
        )
        for x, o in enumerate(OBJECTIVES):
            low, high = bounds[o.name]
            share = 0.5 if high == low else (member.objectives[o.name] - low) / (high - low)
            trace["x"].append(x)
            trace["y"].append(round(share if o.direction == "max" else 1.0 - share, 4))
            trace["text"].append(
                _text(
                    f"#{member.id} · generation {member.generation} · {o.name} "
                    f"{_member_value(member, o.name)} {o.unit}"
                )
            )
        trace["x"].append(None)
        trace["y"].append(None)
        trace["text"].append("")
    traces: list[dict[str, Any]] = [lines[g] for g in sorted(lines)]
    # The colour scale, on a trace with nothing to draw.
    traces.append(
        {
            "type": "scatter",
            "mode": "markers",
            "x": [None],
            "y": [None],
            "hoverinfo": "skip",
            "showlegend": False,
            "marker": {
                "color": [low_gen],
                "cmin": low_gen,
                "cmax": high_gen if high_gen > low_gen else low_gen + 1,
                "colorscale": _COLORSCALE,
                "showscale": True,
                "colorbar": _colorbar(front),
            },
        }
    )
    annotations = []
    shapes = []
    for x, o in enumerate(OBJECTIVES):
        low, high = bounds[o.name]
        best, worst = (high, low) if o.direction == "max" else (low, high)
        shapes.append(
            {
                "type": "line",
                "x0": x,
                "x1": x,
                "y0": 0,
                "y1": 1,
                "layer": "below",
                "line": {"color": "#57606a", "width": 1},
            }
        )
        for y, value, anchor in ((1.0, best, "bottom"), (0.0, worst, "top")):
            annotations.append(
                {
                    "x": x,
                    "y": y,
                    "text": _text(format_value(value)),
                    "showarrow": False,
                    "yanchor": anchor,
                    "yshift": 4 if anchor == "bottom" else -4,
                    "font": {"size": 11},
                }
            )
    layout = {
        "title": {
            "text": "One line per front member, each axis better-up (colour: generation found)"
        },
        "height": 480,
        "hovermode": "closest",
        "xaxis": {
            "tickvals": xs,
            "ticktext": [
                f"{_text(o.name)} {'↑' if o.direction == 'max' else '↓'}<br>({_text(o.unit)})"
                for o in OBJECTIVES
            ],
            "range": [-0.3, len(OBJECTIVES) - 0.7],
            "showgrid": False,
            "zeroline": False,
            "side": "bottom",
        },
        "yaxis": {"visible": False, "range": [-0.12, 1.12]},
        "shapes": shapes,
        "annotations": annotations,
        "margin": {"l": 40, "r": 110, "t": 70, "b": 70},
    }
    return {"div": "front-parallel", "data": traces, "layout": layout}


def _history(data: ReportData) -> dict[str, Any]:
    rows = data.history
    gens = [r["generation"] for r in rows]
    hover = []
    for r in rows:
        lines = [f"generation {r['generation']}"]
        lines += [
            f"{label} {format_value(r.get(key))}"
            for key, label in (
                ("hypervolume", "hypervolume"),
                ("front_size", "front size"),
                ("offspring", "offspring"),
                ("evaluated", "evaluated"),
                ("cache_hits", "cache hits"),
                ("reused", "reused"),
                ("failed", "failed"),
                ("evaluations_total", "evaluations so far"),
                ("seconds", "seconds"),
            )
        ]
        hover.append("<br>".join(_text(line) for line in lines))
    traces = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": "hypervolume",
            "x": gens,
            "y": [r.get("hypervolume") for r in rows],
            "text": hover,
            "hovertemplate": "%{text}<extra></extra>",
        },
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": "front size",
            "x": gens,
            "y": [r.get("front_size") for r in rows],
            "yaxis": "y2",
            "line": {"dash": "dot"},
            "text": hover,
            "hovertemplate": "%{text}<extra></extra>",
        },
    ]
    layout = {
        "title": {"text": "Hypervolume and front size per generation"},
        "height": 420,
        "xaxis": {"title": {"text": "generation"}, **_whole(gens)},
        "yaxis": {"title": {"text": "hypervolume (last generation's box)"}},
        "yaxis2": {
            "title": {"text": "front size"},
            "overlaying": "y",
            "side": "right",
            "rangemode": "tozero",
            "tickmode": "auto",
            "showgrid": False,
        },
        "legend": {"orientation": "h", "y": -0.2},
        "hovermode": "closest",
    }
    return {"div": "history", "data": traces, "layout": layout}


def _lineage(data: ReportData) -> dict[str, Any]:
    lineage, pos = data.lineage, data.positions
    front_ids = set(lineage.roots) | {n.id for n in lineage.nodes.values() if n.on_front}
    ex: list[float | None] = []
    ey: list[float | None] = []
    mid_x, mid_y, mid_text = [], [], []
    for edge in lineage.edges:
        (x0, y0), (x1, y1) = pos[edge.parent], pos[edge.child]
        ex += [x0, x1, None]
        ey += [y0, y1, None]
        if edge.deltas:
            mid_x.append((x0 + x1) / 2.0)
            mid_y.append((y0 + y1) / 2.0)
            lines = [f"#{edge.parent} → #{edge.child}"] + [
                f"Δ {name} {value:+.4g}" for name, value in edge.deltas.items()
            ]
            mid_text.append("<br>".join(_text(line) for line in lines))
    traces: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "parent → child",
            "x": ex,
            "y": ey,
            "line": {"color": "#c8cdd3", "width": 1},
            "hoverinfo": "skip",
        }
    ]
    if mid_x:
        traces.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "change parent → child",
                "x": mid_x,
                "y": mid_y,
                "marker": {"size": 5, "color": "#c8cdd3"},
                "text": mid_text,
                "hovertemplate": "%{text}<extra></extra>",
                "showlegend": False,
            }
        )
    for on_front in (False, True):
        nodes = [lineage.nodes[i] for i in sorted(lineage.nodes) if (i in front_ids) == on_front]
        if not nodes:
            continue
        traces.append(
            {
                "type": "scatter",
                "mode": "markers+text" if on_front and len(nodes) <= 40 else "markers",
                "name": "on the front" if on_front else "ancestor",
                "x": [pos[n.id][0] for n in nodes],
                "y": [pos[n.id][1] for n in nodes],
                "text": [f"#{n.id}" for n in nodes] if on_front else None,
                "textposition": "top center",
                "hovertext": [_node_hover(n) for n in nodes],
                "hovertemplate": "%{hovertext}<extra></extra>",
                "marker": {
                    "size": 13 if on_front else 9,
                    "color": _FRONT_COLOR if on_front else _ANCESTOR_COLOR,
                    "symbol": [
                        "x" if n.status in ("failed", "infeasible") else "circle" for n in nodes
                    ],
                    "line": {"width": 1, "color": "white"},
                },
            }
        )
    generations = sorted({n.generation for n in lineage.nodes.values()})
    layout = {
        "title": {
            "text": "Lineage of the front (x: generation; hover a node for how it was made)"
        },
        "height": int(min(1800, max(440, 26 * widest_layer(lineage) + 160))),
        "xaxis": {"title": {"text": "generation"}, "zeroline": False, **_whole(generations)},
        "yaxis": {"visible": False},
        "hovermode": "closest",
        "legend": {"orientation": "h", "y": -0.12},
    }
    return {"div": "lineage", "data": traces, "layout": layout}


def _operators(data: ReportData) -> dict[str, Any]:
    rows = data.operators
    names = [_text(f"{r['operator']} ({r.get('children', 0)})") for r in rows]
    traces = []
    for key, label in SHARES:
        values = [None if r.get(key) is None else 100.0 * float(r[key]) for r in rows]
        traces.append(
            {
                "type": "bar",
                "name": label,
                "x": names,
                "y": values,
                "hovertemplate": f"%{{x}}<br>{label}: %{{y:.0f}}%<extra></extra>",
            }
        )
    layout = {
        "title": {"text": "Operator credit (share of each operator's children; n in brackets)"},
        "height": 420,
        "barmode": "group",
        "yaxis": {"title": {"text": "% of children"}, "range": [0, 100]},
        "legend": {"orientation": "h", "y": -0.25},
    }
    return {"div": "operators", "data": traces, "layout": layout}


def _whole(generations: Sequence[int]) -> dict[str, Any]:
    """A tick on every generation while there are few (plotly would add halves)."""
    return {"dtick": 1} if len(set(generations)) <= 30 else {}


def _colorbar(front: Sequence[FrontMember]) -> dict[str, Any]:
    """Generations are whole numbers: one tick each while there are few."""
    gens = [m.generation for m in front]
    bar: dict[str, Any] = {"title": {"text": "generation"}}
    if max(gens) - min(gens) <= 15:
        bar |= {"tickmode": "linear", "tick0": min(gens), "dtick": 1}
    return bar


def _member_value(member: FrontMember, objective: str) -> str:
    """One objective of a front member as text; accuracy ``0.936 ± 0.015`` where the record
    holds its standard error."""
    if objective == "accuracy" and member.accuracy.stderr is not None:
        return member.accuracy.text()
    return format_value(member.objectives[objective])


def _task_value(entry: Mapping[str, Any]) -> str:
    """A task's score, ``0.812 ± 0.010`` where the record holds its standard error."""
    return AccuracyEstimate(entry["score"], entry["stderr"]).text()


def _task_how(entry: Mapping[str, Any]) -> str:
    """What a task's score is: its metric, items and weight, those the record holds."""
    parts = [str(entry["metric"])] if entry["metric"] else []
    if entry["n"] is not None:
        parts.append(f"{entry['n']} items")
    if entry["weight"] is not None:
        parts.append(f"weight {entry['weight']:g}")
    return ", ".join(parts)


def _member_hover(member: FrontMember) -> str:
    lines = [f"#{member.id} · generation {member.generation}"]
    lines += [f"{o.name} {_member_value(member, o.name)} {o.unit}" for o in OBJECTIVES]
    for name, entry in member.tasks.items():
        how = _task_how(entry)
        lines.append(f"task {name} {_task_value(entry)}" + (f" ({how})" if how else ""))
    lines += textwrap.wrap(render_recipe(member.recipe), _HOVER_WIDTH)
    return "<br>".join(_text(line) for line in lines)


def _node_hover(node: Node) -> str:
    lines = [f"#{node.id} · generation {node.generation} · slot {node.slot}"]
    lines.append("made by: " + (" + ".join(node.operators) or "initial population"))
    status = node.status or "not evaluated"
    if node.reason:
        status += f": {node.reason}"
    lines += textwrap.wrap(status, _HOVER_WIDTH)
    if node.objectives:
        lines.append(
            " · ".join(
                f"{o.name} {format_value(node.objectives[o.name])}"
                for o in OBJECTIVES
                if o.name in node.objectives
            )
        )
    lines += textwrap.wrap(render_recipe(node.recipe), _HOVER_WIDTH)
    said = node_rationale(node)
    if said is not None:
        who, rationale = said
        clipped = _clip(f"LLM {who}: {rationale}", _HOVER_CLIP)
        lines += textwrap.wrap(clipped, _HOVER_WIDTH)
    return "<br>".join(_text(line) for line in lines)


# ---------------------------------------------------------------------- HTML
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1200px; padding: 1em 2em; color: #1f2328; }
h1 { margin-bottom: 0.2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1.2em; }
dl.meta dt { font-weight: 600; }
dl.meta dd { margin: 0; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.6em; vertical-align: top; text-align: left; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.how { color: #57606a; font-size: 0.85em; white-space: normal; }
.note { color: #57606a; }
.warn { color: #9a6700; }
.llm { color: #57606a; font-size: 0.85em; margin-top: 0.3em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
code { font-size: 0.9em; }
.plot { width: 100%; }
"""

_NAV = (
    '<nav class="note">'
    + " · ".join(
        f'<a href="#section-{anchor}">{title}</a>'
        for anchor, title in (
            ("front", "front"),
            ("progress", "progress"),
            ("lineage", "lineage"),
            ("operators", "operators"),
            ("recipes", "front recipes"),
            ("config", "config"),
        )
    )
    + "</nav>"
)

# plotly.js (4.8 MB with plotly 7) and the figures travel gzipped and base64-encoded in data
# blocks (``<script type="application/gzip">``, never run): a long run's page stays a few MB.
# The page's one script unpacks them with the browser's DecompressionStream, runs plotly.js
# (allowed by its hash) and draws the figures. The counts in data-plots / data-rendered let a
# test (or a person) check that every plot was drawn.
_APP = """(function () {
  "use strict";
  function unpack(id) {
    var text = atob(document.getElementById(id).textContent.trim());
    var bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i += 1) {
      bytes[i] = text.charCodeAt(i);
    }
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text();
  }
  function fail(error) {
    document.body.setAttribute("data-error", String(error));
    throw error;
  }
  if (typeof DecompressionStream === "undefined") {
    fail(new Error("this browser cannot unpack the figures (no DecompressionStream): " +
      "open the report in a browser from 2023 or later, or see the PNGs beside it"));
  }
  Promise.all([unpack("plotly-js"), unpack("report-figures")]).then(function (texts) {
    var library = document.createElement("script");
    library.textContent = texts[0];
    document.head.appendChild(library);
    var figures = JSON.parse(texts[1]);
    var config = {displaylogo: false, responsive: true};
    var drawn = 0;
    // A trace's "columns" names the figure's shared value lists to use ("marker.color": one
    // level down): a long run's values are written once, not once per panel.
    figures.forEach(function (figure) {
      figure.data.forEach(function (trace) {
        Object.keys(trace.columns || {}).forEach(function (key) {
          var path = key.split("."), values = figure.columns[trace.columns[key]];
          if (path.length === 2) {
            trace[path[0]][path[1]] = values;
          } else {
            trace[key] = values;
          }
        });
        delete trace.columns;
      });
    });
    return Promise.all(figures.map(function (figure) {
      return Plotly.newPlot(figure.div, figure.data, figure.layout, config).then(function () {
        drawn += 1;
        document.body.setAttribute("data-rendered", String(drawn));
      });
    }));
  }).catch(fail);
})();
"""


def render_html(data: ReportData, plotly: str) -> str:
    """The report page for ``data`` with ``plotly`` (the plotly.js source) inline."""
    figs = figures(data)
    drawn = {f["div"] for f in figs}
    app = _inline_script(_APP)
    # The hash of the text the page unpacks and runs, byte for byte.
    csp = _CSP.format(hashes=f"{_sha256(plotly)} {_sha256(app)}")
    name = str(data.status.get("name") or data.status.get("run_dir") or "run")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>evo-compress report: {_esc(name)}</title>",
        f"<style>{_STYLE}</style>",
        f'</head><body data-plots="{len(figs)}" data-rendered="0">',
        f"<h1>evo-compress run <code>{_esc(name)}</code></h1>",
        _header(data),
        _NAV,
        '<h2 id="section-front">Front</h2>',
        _front_intro(data),
        _plot_div("front-matrix", drawn, "no front yet: no generation has completed"),
        _plot_div("front-parallel", drawn, ""),
        '<h2 id="section-progress">Progress</h2>',
        _plot_div("history", drawn, "no generation has completed yet"),
        '<h2 id="section-lineage">Lineage</h2>',
        _plot_div("lineage", drawn, "no front, so no lineage to show"),
        '<h2 id="section-operators">Operators</h2>',
        _plot_div("operators", drawn, "no offspring yet: operators made nothing so far"),
        _operator_table(data),
        '<h2 id="section-recipes">Front recipes</h2>',
        _front_table(data),
        '<h2 id="section-config">Config</h2>',
        f"<pre>{_esc(data.config_yaml)}</pre>",
        '<noscript><p class="warn">The figures need JavaScript: see the PNGs beside this '
        "file (written by <code>evo-compress report</code>).</p></noscript>",
        f'<script type="application/gzip" id="plotly-js">{_packed(plotly)}</script>',
        f'<script type="application/gzip" id="report-figures">{pack(script_json(figs))}</script>',
        f"<script>{app}</script>",
        "</body></html>",
        "",
    ]
    return "\n".join(parts)


def _header(data: ReportData) -> str:
    status = data.status
    done, target = status.get("generations_done"), status.get("generations_target")
    by_status = ", ".join(f"{k} {v}" for k, v in sorted((status.get("by_status") or {}).items()))
    by_source = ", ".join(f"{k} {v}" for k, v in sorted((status.get("by_source") or {}).items()))
    evaluations = format_value(status.get("evaluations"))
    if by_status:
        evaluations += f" ({by_status}; source: {by_source})"
    items: list[tuple[str, str]] = [
        ("run", str(status.get("name"))),
        ("run directory", str(status.get("run_dir"))),
        ("state", str(status.get("state"))),
        ("generations", f"{done} of {target}"),
        ("evaluations", evaluations),
        ("front size", format_value(status.get("front_size"))),
        ("hypervolume", format_value(status.get("hypervolume"))),
        ("evaluator", data.evaluator),
    ]
    if data.model:
        items.append(("model", data.model))
    llm = status.get("llm")
    if llm:
        cost = "" if llm.get("cost") is None else f", ${llm['cost']:.4f}"
        items.append(
            (
                "LLM requests",
                f"{llm.get('requests')} ({format_value(llm.get('input_tokens'))} tokens in, "
                f"{format_value(llm.get('output_tokens'))} out{cost})",
            )
        )
    items.append(("started", _when(data.created_at)))
    items.append(("report written", _when(time.time())))
    rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items)
    return f'<dl class="meta">{rows}</dl>'


def _front_intro(data: ReportData) -> str:
    if not data.front:
        return ""
    text = (
        f"{len(data.front)} recipes that no other evaluated recipe dominates. "
        "Hover a point for the member and its recipe; ↑ higher is better, ↓ lower is better."
    )
    out = f'<p class="note">{_esc(text)}</p>'
    if not data.front_feasible:
        out += (
            '<p class="warn">No recipe met every constraint yet: shown are the members of '
            "the population that violate them least.</p>"
        )
    return out


def _plot_div(div: str, drawn: set[str], missing: str) -> str:
    if div in drawn:
        return f'<div id="{div}" class="plot"></div>'
    return f'<p class="note">{_esc(missing)}</p>' if missing else ""


def _operator_table(data: ReportData) -> str:
    if not data.operators:
        return ""
    llm = any(r.get("llm_calls") is not None for r in data.operators)
    head = ["operator", "children", *(label for _, label in SHARES), "HV contribution"]
    head += ["fallbacks"]
    if llm:
        head += ["LLM requests (valid)", "tokens in", "tokens out", "cost (USD)"]
    rows = []
    for r in data.operators:
        cells = [f"<td>{_esc(r['operator'])}</td>", _num(r.get("children"))]
        cells += [f'<td class="num">{format_share(r.get(key))}</td>' for key, _ in SHARES]
        cells += [_num(r.get("hv_contribution")), _num(r.get("fallbacks"))]
        if llm:
            calls = r.get("llm_calls")
            text = "-" if calls is None else f"{calls} ({r.get('llm_valid')})"
            cells += [f'<td class="num">{_esc(text)}</td>']
            cells += [_num(r.get("input_tokens")), _num(r.get("output_tokens"))]
            cells += [_num(r.get("cost"))]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "".join(f"<th>{_esc(h)}</th>" for h in head)
    note = (
        '<p class="note">valid: share of evaluated children that evaluated ok; feasible, '
        "dominated a parent, entered the front: shares of the credited children; HV "
        "contribution: front hypervolume only its children cover (summed).</p>"
    )
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>{note}"


def _front_table(data: ReportData) -> str:
    if not data.front:
        return '<p class="note">no front yet</p>'
    hows = {o.name: [how_text(m.how, o.name) for m in data.front] for o in OBJECTIVES}
    shared = {name: texts[0] for name, texts in hows.items() if len(set(texts)) == 1}
    intro = ""
    if len(shared) == len(OBJECTIVES) and len(set(shared.values())) == 1:
        # One way for every value (the synthetic evaluator): say it once, above the table.
        intro = f'<p class="note">Every value: {_esc(next(iter(shared.values())))}.</p>'
        shared = {name: "" for name in shared}
    head = ["<th>#</th>", "<th>generation</th>"]
    for o in OBJECTIVES:
        arrow = "↑" if o.direction == "max" else "↓"
        cell = f"{_esc(o.name)} {arrow}<br><span class='how'>{_esc(o.unit)}</span>"
        if shared.get(o.name):
            cell += f"<div class='how'>{_esc(shared[o.name])}</div>"
        head.append(f"<th>{cell}</th>")
    # Several tasks: one column of scores each (with one, accuracy is its score).
    tasks = front_tasks(data.front)
    tasks = tasks if len(tasks) > 1 else []
    for task in tasks:
        head.append(f"<th>task {_esc(task)}<br><span class='how'>score</span></th>")
    head.append("<th>recipe</th>")
    rows = []
    for index, member in enumerate(data.front):
        cells = [_num(member.id), _num(member.generation)]
        for o in OBJECTIVES:
            value = _member_value(member, o.name)
            how = "" if o.name in shared else f"<div class='how'>{_esc(hows[o.name][index])}</div>"
            cells.append(f'<td class="num">{_esc(value)}{how}</td>')
        for task in tasks:
            entry = member.tasks.get(task)
            if entry is None:
                cells.append('<td class="num">-</td>')
                continue
            how = _task_how(entry)
            how = f"<div class='how'>{_esc(how)}</div>" if how else ""
            cells.append(f'<td class="num">{_esc(_task_value(entry))}{how}</td>')
        cells.append(f"<td>{_recipe_cell(member, data.lineage.nodes.get(member.id))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = intro
    if not data.front_feasible:
        note += '<p class="warn">Infeasible: no recipe met every constraint yet.</p>'
    return (
        f"{note}<table><thead><tr>{''.join(head)}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _recipe_cell(member: FrontMember, node: Node | None) -> str:
    out = f"<code>{_esc(render_recipe(member.recipe))}</code>"
    if node is not None:
        made = " + ".join(node.operators) or "initial population"
        out += f"<div class='how'>made by: {_esc(made)}</div>"
        said = node_rationale(node)
        if said is not None:
            who, rationale = said
            out += f"<div class='llm'>LLM {_esc(who)}: {_esc(rationale)}</div>"
    full = render_recipe_yaml(member.recipe)
    return out + f"<details><summary>full recipe</summary><pre>{_esc(full)}</pre></details>"


# ---------------------------------------------------------------------- escaping
def script_json(value: Any) -> str:
    """JSON safe inside an inline ``<script>``: no ``<``, ``>`` or ``&`` (so no ``</script>``
    or ``<!--`` can end or bend the script), no raw U+2028/9; non-finite numbers become null."""
    text = json.dumps(_finite(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


def pack(text: str) -> str:
    """``text`` as UTF-8, gzipped and base64-encoded: what the page's script unpacks."""
    return base64.b64encode(gzip.compress(text.encode("utf-8"), 6, mtime=0)).decode("ascii")


@functools.lru_cache(maxsize=2)
def _packed(text: str) -> str:
    return pack(text)  # plotly.js: the same for every report a process writes


def _inline_script(source: str) -> str:
    """``source`` ready to sit between <script> tags. The HTML parser turns CR LF into LF before
    the browser hashes a script, so line ends are normalised first to keep the CSP hash
    right; a ``</script`` or ``<!--`` (only ever inside a JS string) is escaped."""
    text = source.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("</script", "<\\/script").replace("<!--", "<\\!--")


def _sha256(script: str) -> str:
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def _text(value: Any) -> str:
    """Text for plotly.js, which reads ``<br>``, ``<b>``, ``<a href>``... in its strings and
    decodes ``&amp;``, ``&lt;``, ``&gt;`` (but not ``&quot;``): escape just those three."""
    return html.escape(str(value), quote=False)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    return f'<td class="num">{_esc(format_value(value))}</td>'


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_finite(v) for v in value]
    return value


def _clip(text: str, width: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "unknown"
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _get(mapping: Mapping[str, Any], *keys: str) -> Any:
    node: Any = mapping
    for key in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node
