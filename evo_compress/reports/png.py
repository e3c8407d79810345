"""The report's main plots as PNG files (matplotlib, Agg: no display needed), for terminals and
papers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evo_compress.exceptions import EvoCompressError
from evo_compress.objectives import OBJECTIVES
from evo_compress.reports.data import ReportData, collect
from evo_compress.reports.formatting import SHARES
from evo_compress.reports.layout import widest_layer
from evo_compress.runs.store import RunStore

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PNG_NAMES = (
    "front_scatter_matrix.png",
    "front_parallel_coordinates.png",
    "hypervolume.png",
    "operators.png",
    "lineage.png",
)
_DPI = 120
_CMAP = "viridis"
_FRONT_COLOR = "#d62728"
_ANCESTOR_COLOR = "#9aa5b1"


def write_pngs(store: RunStore, out_dir: Path) -> list[Path]:
    """Write ``PNG_NAMES`` into ``out_dir`` (created if missing); returns their paths. A plot
    with nothing to show yet (no front, no offspring) says so instead."""
    out_dir = Path(out_dir)
    data = collect(store)
    drawers: tuple[Callable[[ReportData], Figure], ...] = (
        _scatter_matrix,
        _parallel_coordinates,
        _hypervolume,
        _operators,
        _lineage,
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvoCompressError(f"cannot create {out_dir}: {exc.strerror}") from None
    paths = []
    for name, draw in zip(PNG_NAMES, drawers, strict=True):
        figure = draw(data)
        path = out_dir / name
        try:
            figure.savefig(path, dpi=_DPI)
        except OSError as exc:
            raise EvoCompressError(f"cannot write {path}: {exc.strerror}") from None
        paths.append(path)
    return paths


def _figure(width: float, height: float) -> Figure:
    # A bare Figure on an Agg canvas: no pyplot, so no global state and no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _empty(title: str, message: str) -> Figure:
    figure = _figure(6, 3)
    ax = figure.subplots()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", color="#57606a")
    return figure


def _integer_ticks(colorbar: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    colorbar.locator = MaxNLocator(integer=True)
    colorbar.update_ticks()


def _label(objective: Any) -> str:
    arrow = "↑" if objective.direction == "max" else "↓"
    return f"{objective.name} {arrow}\n({objective.unit})"


def _scatter_matrix(data: ReportData) -> Figure:
    title = "Front: every pair of objectives (colour: generation found)"
    if not data.front:
        return _empty(title, "no front yet")
    n = len(OBJECTIVES)
    figure = _figure(2.4 * n, 2.3 * n)
    axes = figure.subplots(n, n, squeeze=False, sharex="col")
    gens = [m.generation for m in data.front]
    values = {o.name: [m.objectives[o.name] for m in data.front] for o in OBJECTIVES}
    marker = "o" if data.front_feasible else "x"
    scatter = None
    for i, row_objective in enumerate(OBJECTIVES):
        for j, col_objective in enumerate(OBJECTIVES):
            ax = axes[i][j]
            if j > i:
                ax.set_axis_off()
                continue
            if i == j:
                ax.hist(values[row_objective.name], bins=min(12, max(3, len(gens))), color="#9ab")
                ax.set_yticks([])
            else:
                scatter = ax.scatter(
                    values[col_objective.name],
                    values[row_objective.name],
                    c=gens,
                    cmap=_CMAP,
                    marker=marker,
                    s=22,
                    vmin=min(gens),
                    vmax=max(gens) if max(gens) > min(gens) else min(gens) + 1,
                )
            ax.tick_params(labelsize=7)
            if i == n - 1:
                ax.set_xlabel(_label(col_objective), fontsize=8)
            else:
                ax.tick_params(labelbottom=False)  # shared with the bottom row's axis
            if j == 0 and i > 0:
                ax.set_ylabel(_label(row_objective), fontsize=8)
    if scatter is not None:
        _integer_ticks(
            figure.colorbar(scatter, ax=axes[:, -1].tolist(), label="generation", shrink=0.6)
        )
    if not data.front_feasible:
        title += " - no feasible recipe yet: least-violating shown"
    figure.suptitle(title)
    return figure


def _parallel_coordinates(data: ReportData) -> Figure:
    title = "Front: one line per member, every axis oriented better-up"
    if not data.front:
        return _empty(title, "no front yet")
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    figure = _figure(11, 5.5)
    ax = figure.subplots()
    n = len(OBJECTIVES)
    bounds = {}
    for o in OBJECTIVES:
        vals = [m.objectives[o.name] for m in data.front]
        bounds[o.name] = (min(vals), max(vals))
    gens = [m.generation for m in data.front]
    norm = Normalize(min(gens), max(gens) if max(gens) > min(gens) else min(gens) + 1)
    cmap = colormaps[_CMAP]
    for member in data.front:
        ys = []
        for o in OBJECTIVES:
            low, high = bounds[o.name]
            share = 0.5 if high == low else (member.objectives[o.name] - low) / (high - low)
            ys.append(share if o.direction == "max" else 1.0 - share)
        ax.plot(range(n), ys, color=cmap(norm(member.generation)), alpha=0.8, linewidth=1.4)
        if len(data.front) <= 8:
            ax.annotate(
                f"#{member.id}",
                (0, ys[0]),
                xytext=(-4, 0),
                textcoords="offset points",
                ha="right",
                va="center",
                fontsize=7,
            )
    for x, o in enumerate(OBJECTIVES):
        ax.axvline(x, color="#57606a", linewidth=0.8)
        low, high = bounds[o.name]
        best, worst = (high, low) if o.direction == "max" else (low, high)
        ax.annotate(
            f"{best:.4g}",
            (x, 1.0),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
        ax.annotate(
            f"{worst:.4g}",
            (x, 0.0),
            xytext=(0, -4),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=8,
        )
    ax.set_xticks(range(n), [_label(o) for o in OBJECTIVES], fontsize=9)
    ax.tick_params(axis="x", pad=18)
    ax.set_yticks([])
    ax.set_xlim(-0.4, n - 0.6)
    ax.set_ylim(-0.08, 1.08)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    from matplotlib.cm import ScalarMappable

    _integer_ticks(
        figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="generation")
    )
    ax.set_title(title)
    return figure


def _hypervolume(data: ReportData) -> Figure:
    title = "Hypervolume and front size per generation"
    if not data.history:
        return _empty(title, "no generation has completed yet")
    figure = _figure(8, 4.2)
    ax = figure.subplots()
    gens = [r["generation"] for r in data.history]
    hv = [r.get("hypervolume") for r in data.history]
    size = [r.get("front_size") for r in data.history]
    ax.plot(gens, [float("nan") if v is None else v for v in hv], "o-", label="hypervolume")
    ax.set_xlabel("generation")
    ax.set_ylabel("hypervolume (last generation's box)")
    twin = ax.twinx()
    twin.plot(
        gens,
        [float("nan") if v is None else v for v in size],
        "s:",
        color="#ff7f0e",
        label="front size",
    )
    twin.set_ylabel("front size")
    twin.set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    twin.yaxis.set_major_locator(MaxNLocator(integer=True))
    if len(gens) <= 30:
        ax.set_xticks(gens)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return figure


def _operators(data: ReportData) -> Figure:
    title = "Operator credit (share of each operator's children)"
    if not data.operators:
        return _empty(title, "no offspring yet")
    rows = data.operators
    figure = _figure(max(6.0, 1.6 * len(rows) + 2), 4.5)
    ax = figure.subplots()
    width = 0.8 / len(SHARES)
    for k, (key, label) in enumerate(SHARES):
        xs = [i + (k - (len(SHARES) - 1) / 2) * width for i in range(len(rows))]
        ys = [float("nan") if r.get(key) is None else 100.0 * float(r[key]) for r in rows]
        ax.bar(xs, ys, width=width, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['operator']}\n(n={r.get('children', 0)})" for r in rows])
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of children")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    return figure


def _lineage(data: ReportData) -> Figure:
    title = "Lineage of the front (x: generation)"
    lineage, pos = data.lineage, data.positions
    if not lineage.nodes:
        return _empty(title, "no front, so no lineage")
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    generations = sorted({n.generation for n in lineage.nodes.values()})
    widest = widest_layer(lineage)
    figure = _figure(
        max(7.0, 1.3 * len(generations) + 2), min(30.0, max(4.0, 0.32 * widest + 1.5))
    )
    ax = figure.subplots()
    segments = [(pos[e.parent], pos[e.child]) for e in lineage.edges]
    ax.add_collection(LineCollection(segments, colors="#c8cdd3", linewidths=0.8, zorder=1))
    front_ids = set(lineage.roots) | {n.id for n in lineage.nodes.values() if n.on_front}
    for on_front in (False, True):
        nodes = [n for n in lineage.nodes.values() if (n.id in front_ids) == on_front]
        for failed in (False, True):
            chosen = [n for n in nodes if (n.status in ("failed", "infeasible")) == failed]
            if not chosen:
                continue
            ax.scatter(
                [pos[n.id][0] for n in chosen],
                [pos[n.id][1] for n in chosen],
                s=60 if on_front else 25,
                c=_FRONT_COLOR if on_front else _ANCESTOR_COLOR,
                marker="x" if failed else "o",
                zorder=2,
            )
        if on_front and len(nodes) <= 40:
            for n in nodes:
                x, y = pos[n.id]
                ax.annotate(
                    f"#{n.id}",
                    (x, y),
                    xytext=(0, 5),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
    if len(generations) <= 30:
        ax.set_xticks(generations)
    ax.set_xlabel("generation")
    ax.set_yticks([])
    ax.margins(x=0.08, y=0.08)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.legend(
        handles=[
            Line2D([], [], marker="o", linestyle="", color=_FRONT_COLOR, label="on the front"),
            Line2D([], [], marker="o", linestyle="", color=_ANCESTOR_COLOR, label="ancestor"),
            Line2D([], [], marker="x", linestyle="", color="#57606a", label="failed/infeasible"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    ax.set_title(title)
    return figure
