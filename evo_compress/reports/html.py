"""One self-contained HTML report of a run: the front, its progress, its lineage and what each
operator contributed, with plotly.js inline so that the file opens offline and fetches nothing.

This module assembles the page from ``ReportData`` (``data.py``) and the figures
(``figures.py``).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import html
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
from evo_compress.runs.front import FrontMember, front_tasks
from evo_compress.runs.lineage import Node
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
    items.append(("started", format_time(data.created_at)))
    items.append(("report written", format_time(time.time())))
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
            value = member_value(member, o.name)
            how = "" if o.name in shared else f"<div class='how'>{_esc(hows[o.name][index])}</div>"
            cells.append(f'<td class="num">{_esc(value)}{how}</td>')
        for task in tasks:
            entry = member.tasks.get(task)
            if entry is None:
                cells.append('<td class="num">-</td>')
                continue
            how = task_how(entry)
            how = f"<div class='how'>{_esc(how)}</div>" if how else ""
            cells.append(f'<td class="num">{_esc(task_value(entry))}{how}</td>')
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
