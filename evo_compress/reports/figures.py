"""The plotly figures of the report page as plain specs (``{"div", "data", "layout"}``): the
front as a scatter matrix and parallel coordinates, hypervolume per generation, the lineage and
operator credit. All drawn in SVG, never WebGL; every string from the run is escaped for
plotly.js, which reads a subset of HTML in text."""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence
from typing import Any

from evo_compress.genomes import render_recipe
from evo_compress.objectives import OBJECTIVES
from evo_compress.reports.data import ReportData
from evo_compress.reports.formatting import (
    SHARES,
    format_value,
    member_value,
    node_rationale,
    objective_label,
    task_how,
    task_value,
)
from evo_compress.reports.layout import widest_layer
from evo_compress.runs.front import FrontMember
from evo_compress.runs.lineage import Node
from evo_compress.text import clip

# The plot divs, in page order; the page sets ``body[data-rendered]`` once each is drawn.
PLOT_IDS = ("front-matrix", "front-parallel", "history", "lineage", "operators")
# Drawn in SVG (plotly ``scatter``), not WebGL (``splom``, ``parcoords``, ``scattergl``): the
# front must show in a browser without WebGL (headless, remote desktops, previews).
FRONT_PLOT_IDS = PLOT_IDS[:2]
# Evaluated recipes drawn behind the front at most: a long run's page stays small and quick.
MAX_EVALUATED_POINTS = 1000
_HOVER_WIDTH = 80
_HOVER_CLIP = 600
_COLORSCALE = "Viridis"
_FRONT_COLOR = "#d62728"
_ANCESTOR_COLOR = "#9aa5b1"
_EVALUATED_COLOR = "rgba(154, 165, 177, 0.45)"


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
    page's script hands it to every panel that uses it (see ``templates/report.js``)."""
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
                    f"{member_value(member, o.name)} {o.unit}"
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


def _member_hover(member: FrontMember) -> str:
    lines = [f"#{member.id} · generation {member.generation}"]
    lines += [f"{o.name} {member_value(member, o.name)} {o.unit}" for o in OBJECTIVES]
    for name, entry in member.tasks.items():
        how = task_how(entry)
        lines.append(f"task {name} {task_value(entry)}" + (f" ({how})" if how else ""))
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
        clipped = clip(f"LLM {who}: {rationale}", _HOVER_CLIP)
        lines += textwrap.wrap(clipped, _HOVER_WIDTH)
    return "<br>".join(_text(line) for line in lines)


def sample_evaluated(
    points: Sequence[tuple[int, int, dict[str, float]]], limit: int = MAX_EVALUATED_POINTS
) -> list[tuple[int, int, dict[str, float]]]:
    """At most ``limit`` of ``points``, evenly spaced by id (so every stage of the search shows)
    and the same on every call: two reports of one run draw the same points."""
    if len(points) <= limit:
        return list(points)
    return [points[k * len(points) // limit] for k in range(limit)]


def _text(value: Any) -> str:
    """Text for plotly.js, which reads ``<br>``, ``<b>``, ``<a href>``... in its strings and
    decodes ``&amp;``, ``&lt;``, ``&gt;`` (but not ``&quot;``): escape just those three."""
    return html.escape(str(value), quote=False)
