"""One self-contained HTML report of a run: the front, its progress, its lineage and what each
operator contributed, with plotly.js inline so that the file opens offline and fetches nothing.

This module assembles the page: it turns ``ReportData`` (``data.py``) into the values the
Jinja template ``templates/report.html.j2`` shows (autoescaped), packs plotly.js and the
figures (``figures.py``) and signs the page's one script (``templates/report.js``) in its
Content-Security-Policy.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2

from evo_compress.exceptions import EvoCompressError
from evo_compress.genomes import render_recipe, render_recipe_yaml
from evo_compress.objectives import OBJECTIVES
from evo_compress.reports.data import ReportData, collect
from evo_compress.reports.figures import (
    FRONT_PLOT_IDS,
    MAX_EVALUATED_POINTS,
    PLOT_IDS,
    figures,
    sample_evaluated,
)
from evo_compress.reports.formatting import (
    SHARES,
    SYNTHETIC_HOW,
    format_share,
    format_time,
    format_value,
    how_text,
    member_value,
    node_rationale,
    objective_label,
    task_how,
    task_value,
)
from evo_compress.reports.layout import lineage_layout, widest_layer
from evo_compress.runs.front import front_tasks
from evo_compress.runs.store import RunStore

# Names that lived here before the report was split into data, layout, figures and page
# modules: importable from here still.
__all__ = [
    "FRONT_PLOT_IDS",
    "MAX_EVALUATED_POINTS",
    "PLOT_IDS",
    "REPORT_NAME",
    "SHARES",
    "SYNTHETIC_HOW",
    "ReportData",
    "collect",
    "figures",
    "format_share",
    "format_value",
    "how_text",
    "lineage_layout",
    "node_rationale",
    "objective_label",
    "pack",
    "plotly_js",
    "render_html",
    "sample_evaluated",
    "script_json",
    "widest_layer",
    "write_report",
]

REPORT_NAME = "report.html"
_TEMPLATE = "report.html.j2"
_SCRIPT = "report.js"
# The page's sections, in order: (anchor, title in the navigation bar).
_SECTIONS = (
    ("front", "front"),
    ("progress", "progress"),
    ("lineage", "lineage"),
    ("operators", "operators"),
    ("recipes", "front recipes"),
    ("config", "config"),
)

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


def render_html(data: ReportData, plotly: str) -> str:
    """The report page for ``data`` with ``plotly`` (the plotly.js source) inline."""
    figs = figures(data)
    app = _inline_script(_page_script())
    # The hash of the text the page unpacks and runs, byte for byte.
    csp = _CSP.format(hashes=f"{_sha256(plotly)} {_sha256(app)}")
    return _template().render(
        csp=csp,
        name=str(data.status.get("name") or data.status.get("run_dir") or "run"),
        drawn={f["div"] for f in figs},
        header=_header(data),
        sections=_SECTIONS,
        front_size=len(data.front),
        feasible=data.front_feasible,
        operators=_operator_table(data),
        recipes=_front_table(data),
        config_yaml=data.config_yaml,
        plotly_js=_packed(plotly),
        report_figures=pack(script_json(figs)),
        app=app,  # marked safe in the template: ``_inline_script`` made it safe there
    )


@functools.lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("evo_compress.reports", "templates"),
        autoescape=True,  # every value from the run is text, never markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return environment.get_template(_TEMPLATE)


@functools.lru_cache(maxsize=1)
def _page_script() -> str:
    """The page's one script, which unpacks plotly.js and the figures and draws them."""
    path = resources.files("evo_compress.reports") / "templates" / _SCRIPT
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------- what the page shows
def _header(data: ReportData) -> list[tuple[str, str]]:
    """The run's facts above the figures, as (label, value)."""
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
    items.append(("started", format_time(data.created_at)))
    items.append(("report written", format_time(time.time())))
    return items


def _operator_table(data: ReportData) -> dict[str, Any] | None:
    """The operator table: its column labels and, per operator, its name and numeric cells."""
    if not data.operators:
        return None
    llm = any(r.get("llm_calls") is not None for r in data.operators)
    head = ["operator", "children", *(label for _, label in SHARES), "HV contribution"]
    head += ["fallbacks"]
    if llm:
        head += ["LLM requests (valid)", "tokens in", "tokens out", "cost (USD)"]
    rows = []
    for r in data.operators:
        values = [format_value(r.get("children"))]
        values += [format_share(r.get(key)) for key, _ in SHARES]
        values += [format_value(r.get("hv_contribution")), format_value(r.get("fallbacks"))]
        if llm:
            calls = r.get("llm_calls")
            values.append("-" if calls is None else f"{calls} ({r.get('llm_valid')})")
            values += [format_value(r.get(k)) for k in ("input_tokens", "output_tokens", "cost")]
        rows.append({"name": str(r["operator"]), "cells": values})
    return {"head": head, "rows": rows}


def _front_table(data: ReportData) -> dict[str, Any] | None:
    """The front's table: one column per objective (with how its values were obtained, once
    in the header where every member shares it) and per task, one row per member."""
    if not data.front:
        return None
    hows = {o.name: [how_text(m.how, o.name) for m in data.front] for o in OBJECTIVES}
    shared = {name: texts[0] for name, texts in hows.items() if len(set(texts)) == 1}
    every = None
    if len(shared) == len(OBJECTIVES) and len(set(shared.values())) == 1:
        # One way for every value (the synthetic evaluator): say it once, above the table.
        every = next(iter(shared.values()))
        shared = {name: "" for name in shared}
    objectives = [
        {
            "name": o.name,
            "arrow": "↑" if o.direction == "max" else "↓",
            "unit": o.unit,
            "how": shared.get(o.name, ""),
        }
        for o in OBJECTIVES
    ]
    # Several tasks: one column of scores each (with one, accuracy is its score).
    tasks = front_tasks(data.front)
    tasks = tasks if len(tasks) > 1 else []
    rows = []
    for index, member in enumerate(data.front):
        values = [
            (member_value(member, o.name), "" if o.name in shared else hows[o.name][index])
            for o in OBJECTIVES
        ]
        scores = []
        for task in tasks:
            entry = member.tasks.get(task)
            scores.append(("-", "") if entry is None else (task_value(entry), task_how(entry)))
        node = data.lineage.nodes.get(member.id)
        rows.append(
            {
                "id": format_value(member.id),
                "generation": format_value(member.generation),
                "cells": values,
                "scores": scores,
                "recipe": render_recipe(member.recipe),
                "made_by": None
                if node is None
                else " + ".join(node.operators) or "initial population",
                "llm": None if node is None else node_rationale(node),
                "recipe_yaml": render_recipe_yaml(member.recipe),
            }
        )
    return {"every": every, "objectives": objectives, "tasks": tasks, "rows": rows}


# ---------------------------------------------------------------------- packing and signing
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


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [_finite(v) for v in value]
    return value
