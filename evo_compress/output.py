"""How commands print what they found: one ``--format`` vocabulary, one JSON writer and the
tables people read.

Every command that prints data takes ``--format table`` (the default; ``tree`` for
``lineage``) or ``--format json``, plus the extra formats a command has always had (``csv``
for ``front``; ``dot``, ``graphml`` for ``lineage``). JSON is one document on stdout with
nothing else there: messages, warnings and progress go to stderr.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from evo_compress.text import terminal_safe

# Piped output (CI logs, files) gets wide lines instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


class Format(str, Enum):
    """The formats every data command has."""

    table = "table"
    json = "json"


class FrontFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class LineageFormat(str, Enum):
    table = "table"  # the tree
    tree = "tree"
    json = "json"
    dot = "dot"
    graphml = "graphml"


FORMAT_HELP = "table (for people) or json (one JSON document on stdout)"


def jsonable(value: Any) -> Any:
    """Plain JSON data: a non-finite float is null (JSON has no NaN), a path is a string,
    tuples and sets are lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str | int | bool) or value is None:
        return value
    return str(value)


def write_json(data: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")


def write_text(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def emit(
    format: str | Enum,
    data: Any,
    table: Callable[[], None],
    **text: Callable[[], str],
) -> None:
    """Print a command's result: ``data`` as JSON, ``table()`` for people, or one of the
    command's own text formats (``csv=...``, ``dot=...``)."""
    name = format.value if isinstance(format, Enum) else format
    if name == Format.json.value:
        write_json(data)
    elif name in text:
        write_text(text[name]())
    else:
        table()


def message(text: str) -> None:
    """A line for the user that is not data: on stderr, so JSON on stdout stays one document."""
    err_console.print(text, highlight=False, markup=False, soft_wrap=True)


# ---------------------------------------------------------------------- the tables
def fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"


def print_status(info: Mapping[str, Any]) -> None:
    """``status``: how far a run got, one fact a line."""
    from evo_compress.runs.hypervolume import Box

    console.print(f"[bold]{info['name']}[/]  {info['run_dir']}", highlight=False)
    console.print(f"state: {info['state']}", highlight=False)
    console.print(
        f"generations: {info['generations_done']} of {info['generations_target']}",
        highlight=False,
    )
    statuses = ", ".join(f"{v} {k}" for k, v in sorted(info["by_status"].items())) or "none"
    sources = ", ".join(f"{v} {k}" for k, v in sorted(info["by_source"].items())) or "none"
    console.print(f"evaluations: {info['evaluations']} ({statuses}; {sources})", highlight=False)
    llm = info["llm"]
    if llm is not None:
        outcomes = ", ".join(f"{v} {k}" for k, v in sorted(llm["by_outcome"].items()))
        cost = f", ${llm['cost']:.4f}" if llm["cost"] is not None else ""
        console.print(
            f"LLM requests: {llm['requests']} ({outcomes}); {llm['input_tokens']} input + "
            f"{llm['output_tokens']} output tokens{cost}; {', '.join(llm['operators'])}",
            highlight=False,
        )
    split = info.get("seconds_split")
    if split:
        phases = split["phases"]
        total = sum(phases.values()) or 1.0
        parts = " · ".join(
            f"{name.replace('_', ' ')} {seconds:,.0f} s ({seconds / total:.0%})"
            for name, seconds in sorted(phases.items(), key=lambda kv: -kv[1])
        )
        console.print(
            f"time by phase over {split['evaluations']} evaluations: {parts}", highlight=False
        )
    if info["hypervolume"] is not None:
        console.print(
            f"front: {info['front_size']} recipes, hypervolume {info['hypervolume']:.4f}",
            highlight=False,
        )
    if info["hv_box"] is not None:
        console.print(
            f"hypervolume box: {Box.from_data(info['hv_box']).describe()}",
            highlight=False,
            markup=False,
        )


_NOISE_PAIRS = 12  # pairs within noise listed under the front table


def print_front(members: Sequence[Any], baseline: Mapping[str, Any] | None = None) -> None:
    """``front`` (and the end of ``run``): one row per member, objectives then the recipe
    (what it changes from ``baseline``, the run's reference recipe, when given)."""
    from evo_compress.fitness.noise import pairs_within_noise
    from evo_compress.genomes import render_recipe
    from evo_compress.objectives import OBJECTIVES
    from evo_compress.runs.front import front_tasks

    if not members:
        console.print("the front is empty (no generation finished, or every evaluation failed)")
        return
    title = "Pareto front" if members[0].feasible else "No feasible recipe; least-violating"
    table = Table(title=title)
    table.add_column("id", justify="right")
    for objective in OBJECTIVES:
        arrow = "↑" if objective.direction == "max" else "↓"
        table.add_column(f"{objective.name} {arrow}\n{objective.unit}", justify="right")
    # Several tasks: one narrow column of scores each (stderr, n, metric: --format json);
    # with one task the accuracy column is its score.
    tasks = front_tasks(members)
    tasks = tasks if len(tasks) > 1 else []
    for task in tasks:
        table.add_column(f"{task}\nscore", justify="right")
    changes = "changes from the baseline; " if baseline is not None else ""
    table.add_column(f"recipe ({changes}all genes: --format json)")
    for m in members:
        shown = render_recipe(m.recipe, omit=("serve",), baseline=baseline)
        values = {o.name: fmt(m.objectives[o.name]) for o in OBJECTIVES}
        if m.accuracy.stderr is not None:
            values["accuracy"] = m.accuracy.text()
        scores = [_task_score(m.tasks.get(task)) for task in tasks]
        table.add_row(str(m.id), *values.values(), *scores, shown)
    console.print(table)
    close = pairs_within_noise([(m.id, m.accuracy) for m in members])
    if close:
        shown_pairs = ", ".join(f"{a}~{b}" for a, b in close[:_NOISE_PAIRS])
        more = f" and {len(close) - _NOISE_PAIRS} more" if len(close) > _NOISE_PAIRS else ""
        console.print(
            f"accuracy within noise (less than 2 combined stderr apart): {shown_pairs}{more}",
            highlight=False,
        )


def _task_score(entry: Mapping[str, Any] | None) -> str:
    return "-" if entry is None else f"{entry['score']:.3f}"


def front_csv(members: Sequence[Any]) -> str:
    """``front --format csv``: one row per member, every gene a column (and, for a back end
    that scores named tasks, each task's score and stderr)."""
    from evo_compress.genomes import flatten
    from evo_compress.objectives import OBJECTIVE_NAMES
    from evo_compress.runs.front import front_tasks

    genes = sorted({k for m in members for k in flatten(m.recipe)})
    tasks = front_tasks(members)
    task_columns = [f"task.{t}.{k}" for t in tasks for k in ("score", "stderr")]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "id",
            "feasible",
            *OBJECTIVE_NAMES,
            "accuracy_stderr",
            "accuracy_n",
            *task_columns,
            *genes,
        ]
    )
    for m in members:
        flat = flatten(m.recipe)
        accuracy = m.accuracy
        task_values = [
            _blank((m.tasks.get(t) or {}).get(k)) for t in tasks for k in ("score", "stderr")
        ]
        writer.writerow(
            [
                m.id,
                m.feasible,
                *[m.objectives[n] for n in OBJECTIVE_NAMES],
                _blank(accuracy.stderr),
                _blank(accuracy.n),
                *task_values,
                *[flat.get(g, "") for g in genes],
            ]
        )
    return out.getvalue()


def _blank(value: Any) -> Any:
    return "" if value is None else value


def print_history(rows: Sequence[Mapping[str, Any]]) -> None:
    """``history``: one row per generation."""
    table = Table(
        title="History",
        caption="hypervolume: each generation's front in the last generation's box",
    )
    columns: tuple[str, ...] = (
        "generation",
        "hypervolume",
        "front_size",
        "evaluated",
        "cache_hits",
    )
    if any(row.get("quick") for row in rows):  # a racing run: how many stopped quick
        columns = (*columns, "quick")
    for name in (*columns, "failed", "seconds"):
        table.add_column(name.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(
            *(
                f"{row[c]:.4f}" if c == "hypervolume" else str(row.get(c))
                for c in (*columns, "failed")
            ),
            f"{row.get('seconds') or 0:.1f}",
        )
    console.print(table)


def print_operators(rows: Sequence[Mapping[str, Any]]) -> None:
    """``operators``: one row per operator, its credit and LLM use."""
    table = Table(title="Operators")
    shares = ("valid", "feasible", "dominated_parent", "entered_front")
    for name in ("operator", "children", *shares, "hv contribution", "fallbacks", "LLM"):
        table.add_column(name.replace("_", " "), justify="left" if name == "operator" else "right")
    for row in rows:
        hv = row.get("hv_contribution")
        llm = ""
        if row.get("llm_calls"):
            cost = f", ${row['cost']:.4f}" if row.get("cost") is not None else ""
            tokens = int(row.get("input_tokens") or 0) + int(row.get("output_tokens") or 0)
            llm = f"{row['llm_calls']} calls, {tokens} tokens{cost}"
            if row.get("tokens_per_evaluated_child") is not None:
                llm += f"; {row['tokens_per_evaluated_child']:.0f} tokens"
                if row.get("cost_per_evaluated_child") is not None:
                    llm += f", ${row['cost_per_evaluated_child']:.4f}"
                llm += " per evaluated child"
        table.add_row(
            str(row["operator"]),
            str(row.get("children", 0)),
            *("-" if row.get(s) is None else f"{row[s]:.0%}" for s in shares),
            "-" if hv is None else f"{hv:.4f}",
            str(row.get("fallbacks", 0)),
            llm,
        )
    console.print(table)


def print_evaluation(recipe: Any, result: Any, hit: bool) -> None:
    """``evaluate``: the recipe, then each objective with its unit and how it was obtained."""
    from evo_compress.fitness.noise import AccuracyEstimate
    from evo_compress.genomes import render_recipe
    from evo_compress.objectives import OBJECTIVES

    source = "fitness cache" if hit else f"evaluated in {result.duration_s:.1f} s"
    console.print(
        f"recipe {recipe.short_hash}: {render_recipe(recipe)}  ({source})",
        highlight=False,
        markup=False,
    )
    if not result.ok:
        console.print(f"[bold red]{result.status}:[/] {result.reason}", highlight=False)
        return
    how = result.metadata.get("objectives", {})
    accuracy = AccuracyEstimate.of(result.objectives, result.metadata)
    table = Table()
    for column in ("objective", "value", "unit", "how it was obtained"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for objective in OBJECTIVES:
        detail = how.get(objective.name, {})
        text = detail.get("how", "") if isinstance(detail, dict) else str(detail)
        if text == "synthetic":
            text = "synthetic: computed, not measured"
        elif (
            isinstance(detail, dict) and detail.get("measured") is False and "estimat" not in text
        ):
            text = f"{text} (estimated)"
        value = fmt(result.objectives[objective.name])
        if objective.name == "accuracy" and accuracy.stderr is not None:
            value = accuracy.text()
            text += (
                f"; ± one stderr over {accuracy.n} items"
                if accuracy.n
                else "; ± the noise setting"
            )
        table.add_row(objective.name, value, objective.unit, text)
    console.print(table)


def print_lines(lines: Sequence[str]) -> None:
    """Plain lines (paths, a validation verdict), read as they are: no markup, and never
    wrapped (a path or a recipe stays one line to copy)."""
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def print_registered(rows: Sequence[Mapping[str, Any]]) -> None:
    """``evo-compress ls``: each registered name, where it comes from and what it is."""
    table = Table(title="Registered")
    for column in ("kind", "name", "from", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            *(terminal_safe(str(row[c])) for c in ("kind", "name", "from", "description"))
        )
    console.print(table, markup=False, highlight=False)


def print_cache_entries(rows: Sequence[Mapping[str, Any]]) -> None:
    """``cache ls``: one row per fitness cache entry, oldest first."""
    from evo_compress.genomes import render_recipe

    if not rows:
        console.print("no entries", highlight=False)
        return
    table = Table(title="Fitness cache", caption="full hashes and every value: --format json")
    for name in ("recipe hash", "status", "class", "created (UTC)", "fingerprint", "hits"):
        table.add_column(name, no_wrap=True, justify="right" if name == "hits" else "left")
    table.add_column("recipe", overflow="fold")
    table.add_column("objectives or reason", overflow="fold")
    for row in rows:
        try:
            recipe = render_recipe(row["recipe"], omit=("serve",))
        except Exception:  # a damaged row still lists
            recipe = "?"
        if isinstance(row.get("objectives"), Mapping):
            outcome = " ".join(
                f"{k}={fmt(v)}" if isinstance(v, (int, float)) else f"{k}={v}"
                for k, v in row["objectives"].items()
            )
        else:
            reason = str(row.get("reason") or "")
            outcome = reason if len(reason) <= 100 else reason[:99] + "…"
        created = row.get("created_at") or "-"
        table.add_row(
            *(
                terminal_safe(str(v))
                for v in (
                    row["recipe_hash"][:12],
                    row["status"],
                    row.get("failure_class") or "",
                    created.replace("T", " ").rstrip("Z"),
                    row["fingerprint"][:12],
                    "-" if row.get("hits") is None else row["hits"],
                    recipe,
                    outcome,
                )
            )
        )
    console.print(table, markup=False, highlight=False)


def print_cache_stats(info: Mapping[str, Any]) -> None:
    """``cache stats``: one fact a line."""

    def counts(data: Mapping[str, int]) -> str:
        return ", ".join(f"{v} {k}" for k, v in data.items()) or "none"

    size = info["file_bytes"]
    hits = info["hits"]
    lines = [
        f"fitness cache: {info['path']}",
        f"file size: {_bytes(size)}",
        f"entries: {info['entries']} ({counts(info['by_status'])})",
        f"failures by class: {counts(info['by_failure_class'])}",
        f"fingerprints: {info['fingerprints']}",
        f"oldest: {info['oldest'] or '-'}",
        f"newest: {info['newest'] or '-'}",
        "hits: not counted (a cache from before hits were counted)"
        if hits is None
        else f"hits: {hits} (on {info['entries_hit']} entries)",
    ]
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def print_cache_forget(info: Mapping[str, Any]) -> None:
    """``cache forget``: what was removed (or would be, with --dry-run)."""
    verb = "would remove" if info.get("dry_run") else "removed"
    if "entries_removed" in info:
        console.print(
            f"{verb} {info['entries_removed']} entries from {info['cache']}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    checkpoints = info.get("checkpoints")
    if checkpoints is not None:
        where = checkpoints["folder"]
        if not checkpoints["exists"]:
            text = f"no checkpoint folder at {where}: nothing to remove"
        else:
            text = (
                f"{verb} {checkpoints['removed']} checkpoints from {where}, "
                f"{_bytes(checkpoints['bytes_freed'])} "
                + ("to free" if info.get("dry_run") else "freed")
                + (f"; {checkpoints['kept']} newer kept" if checkpoints["kept"] else "")
                + (
                    f"; {checkpoints['skipped']} entries that are not checkpoints left alone"
                    if checkpoints["skipped"]
                    else ""
                )
            )
        console.print(text, highlight=False, markup=False, soft_wrap=True)


def _bytes(size: int) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{size} B"
