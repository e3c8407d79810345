"""Take one evaluated recipe of a run to production: the recipe, its measured objectives, the
llm-compressor recipe of its quantization step and a ``vllm serve`` script, in one folder.

What vLLM runs is decided by ``fitness/vllm/compile.py`` (the same rules the ``vllm``
evaluator serves with), the llm-compressor modifiers by ``quantize_job.describe_recipe``.
"""

from __future__ import annotations

import functools
import json
import shlex
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from evo_compress.exceptions import EvaluationError, EvoCompressError, RunStoreError
from evo_compress.fitness.noise import AccuracyEstimate
from evo_compress.fitness.vllm.compile import (
    QuantStep,
    ServePlan,
    VLLMCapabilities,
    compile_recipe,
)
from evo_compress.fitness.vllm.quantize_job import JobError, describe_recipe
from evo_compress.genomes import Recipe, SearchSpace, render_recipe, render_recipe_yaml
from evo_compress.objectives import (
    OBJECTIVES,
    constrained_values,
    constraint_of,
    flat_limits,
    task_entries,
)
from evo_compress.runs.store import CONFIG_NAME, EvaluationRow, IndividualRow, RunStore
from evo_compress.text import format_value

RECIPE_FILE = "recipe.yaml"
OBJECTIVES_FILE = "objectives.json"
LLMCOMPRESSOR_FILE = "llmcompressor_recipe.yaml"
SERVE_FILE = "serve.sh"
NOT_SERVABLE_FILE = "NOT_SERVABLE.txt"
README_FILE = "README.md"
_README_TEMPLATE = "README.md.j2"
# Every file an export may write: a re-export with force replaces (or removes) all of them, so
# a folder never mixes two exports (a stale serve.sh beside a new NOT_SERVABLE.txt).
EXPORT_FILES = (
    RECIPE_FILE,
    OBJECTIVES_FILE,
    LLMCOMPRESSOR_FILE,
    SERVE_FILE,
    NOT_SERVABLE_FILE,
    README_FILE,
)
# The serving environment assumed when none is given: vLLM's current release with an
# llm-compressor environment for the quantization step; the GPU is not known here.
DEFAULT_CAPABILITIES = VLLMCapabilities(quantizer=True)
_CHECKPOINT_BUILDER = "evo_compress/fitness/vllm/checkpoint.py"


@dataclass(frozen=True)
class _Exported:
    """Everything an export writes about, gathered from the run store first."""

    run_name: str
    run_dir: Path
    row: IndividualRow
    evaluation: EvaluationRow
    recipe: Recipe
    space_name: str
    model: str
    evaluator: str
    fingerprint: str | None
    caps: VLLMCapabilities
    plan: ServePlan | None
    unservable: str | None  # why vLLM cannot serve it (plan is None)
    constraints: dict[str, dict[str, Any]]
    on_front: bool

    @property
    def short(self) -> str:
        return self.recipe.short_hash

    @property
    def origin(self) -> str:
        return f"run `{self.run_name}`, individual {self.row.id}, generation {self.row.generation}"

    @property
    def feasible(self) -> bool:
        return all(c["satisfied"] is not False for c in self.constraints.values())

    @property
    def evaluate_command(self) -> str:
        config = shlex.quote(str(self.run_dir / CONFIG_NAME))
        return f"evo-compress evaluate --config {config} --recipe {RECIPE_FILE}"

    @property
    def weight_steps(self) -> list[str]:
        """The pruning and recovery genes of the plan: weight changes llm-compressor does not
        make here, so evo-compress must build the checkpoint."""
        if self.plan is None:
            return []
        return [
            f"{name}={value}"
            for name, value in self.plan.weight_genes.items()
            if name.startswith(("prune.", "recovery."))
        ]


def export_recipe(
    store: RunStore,
    ident: int,
    out: Path,
    *,
    force: bool = False,
    caps: VLLMCapabilities | None = None,
) -> list[Path]:
    """Write individual ``ident`` of the run in ``store`` to the folder ``out``, ready to deploy,
    and return the files written: ``recipe.yaml``, ``objectives.json``,
    ``llmcompressor_recipe.yaml`` (when the recipe needs an llm-compressor quantization step),
    ``serve.sh`` (or ``NOT_SERVABLE.txt`` with the reason) and ``README.md``.

    ``caps`` is the serving environment the engine arguments are compiled for (default: vLLM
    0.33 with a quantization environment, GPU unknown). Existing non-empty export files are
    kept unless ``force``; then any export file this export does not write is removed."""
    info = gather_individual(store, ident, caps or DEFAULT_CAPABILITIES)
    files: dict[str, str] = {
        RECIPE_FILE: _recipe_yaml(info),
        OBJECTIVES_FILE: json.dumps(_objectives_json(info), indent=2, default=str) + "\n",
    }
    if info.plan is not None and info.plan.quant_step is not None:
        files[LLMCOMPRESSOR_FILE] = _llmcompressor_yaml(info, info.plan.quant_step)
    if info.plan is not None:
        files[SERVE_FILE] = _serve_sh(info, info.plan)
    else:
        files[NOT_SERVABLE_FILE] = _not_servable(info)
    files[README_FILE] = _readme(info, files)
    return _write(Path(out), files, force)


# ---------------------------------------------------------------------- reading the run
def gather_individual(store: RunStore, ident: int, caps: VLLMCapabilities) -> _Exported:
    """What the run holds on individual ``ident`` (recipe, evaluation, front membership), for
    the recipe export and the weights export; one-line errors for an unknown or failed id."""
    row = store.individual(ident)  # an unknown id raises, naming it
    evaluation = store.evaluation(ident)
    if evaluation is None:
        raise RunStoreError(
            f"individual {ident} has no successful evaluation (status: not evaluated)"
        )
    result = evaluation.result
    if not result.ok or result.objectives is None:
        why = f"{result.status}: {result.reason}" if result.reason else result.status
        raise RunStoreError(f"individual {ident} has no successful evaluation (status: {why})")
    config = _config_data(store)
    # The baseline reference (generation -1) is a recipe of the base space, not the run's.
    space_key = "base_space" if row.generation < 0 else "space"
    space = SearchSpace.from_data(store.get_meta(space_key))
    recipe = Recipe(row.recipe)
    if recipe.hash != row.hash:
        raise RunStoreError(
            f"{store.run_dir}: individual {ident} is recorded with hash {row.hash[:12]} but its "
            f"recipe hashes to {recipe.short_hash}; the run store is damaged"
        )
    defaults = {name: gene.default for name, gene in space.genes.items()}
    plan: ServePlan | None = None
    unservable: str | None = None
    try:
        plan = compile_recipe(dict(recipe), caps, defaults=defaults)
    except EvaluationError as exc:
        unservable = str(exc)
    checkpoint = store.last_checkpoint()
    archive = checkpoint.algorithm_state.get("archive", []) if checkpoint is not None else []
    evaluator_cfg = config.get("evaluator") or {}
    return _Exported(
        run_name=str(store.get_meta("name", None) or store.run_dir.name),
        run_dir=store.run_dir.resolve(),
        row=row,
        evaluation=evaluation,
        recipe=recipe,
        space_name=space.name,
        model=str((config.get("model") or {}).get("id", "?")),
        evaluator=str(result.metadata.get("evaluator") or evaluator_cfg.get("name", "?")),
        fingerprint=store.get_meta("fingerprint", None),
        caps=caps,
        plan=plan,
        unservable=unservable,
        constraints=_constraints(store, config, result.objectives, result.metadata),
        on_front=ident in archive,
    )


def _config_data(store: RunStore) -> dict[str, Any]:
    """The run's config as plain data (read leniently: an older run's config still exports)."""
    try:
        data = yaml.safe_load(store.get_meta("config", "") or "") or {}
    except yaml.YAMLError:
        raise RunStoreError(f"{store.run_dir}: the stored config is not valid YAML") from None
    if not isinstance(data, dict):
        raise RunStoreError(f"{store.run_dir}: the stored config is not a mapping")
    return data


def _constraints(
    store: RunStore,
    config: Mapping[str, Any],
    objectives: Mapping[str, float],
    metadata: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """The run's constraints (as the engine reads them: one `max_task_drop.<task>` per task)
    and whether this recipe meets each."""
    limits = flat_limits(config.get("constraints") or {})
    values = constrained_values(objectives, metadata)
    out: dict[str, dict[str, Any]] = {}
    for name, limit in limits.items():
        constraint = constraint_of(name)  # a stored config is read leniently
        reference = None
        if constraint is not None and constraint.is_drop:
            row = store.individual_at(-1, 0)
            ref_eval = store.evaluation(row.id) if row is not None else None
            if ref_eval is not None and ref_eval.result.objectives is not None:
                ref = ref_eval.result
                reference = constrained_values(ref.objectives or {}, ref.metadata)
        value = None if constraint is None else constraint.value(values, reference)
        out[name] = {
            "limit": limit,
            "value": value,
            "satisfied": None if value is None else bool(value <= limit),
        }
    return out


def objective_entries(info: _Exported) -> dict[str, dict[str, Any]]:
    """Value, unit and how each objective was obtained (the evaluator's own account)."""
    result = info.evaluation.result
    assert result.objectives is not None
    metadata = result.metadata
    section = metadata.get("objectives")
    section = section if isinstance(section, Mapping) else {}
    entries: dict[str, dict[str, Any]] = {}
    for objective in OBJECTIVES:
        detail = dict(section.get(objective.name) or {})
        how = detail.pop("how", None)
        measured = detail.pop("measured", None)
        detail.pop("unit", None)
        if how is None:
            how = "synthetic" if metadata.get("synthetic") else "not recorded by the evaluator"
        if measured is None and metadata.get("synthetic"):
            measured = False
        entry: dict[str, Any] = {
            "value": result.objectives[objective.name],
            "unit": objective.unit,
            "direction": objective.direction,
            "how": str(how),
            "measured": measured,
        }
        if objective.name == "accuracy":
            # Its noise, from the record's documented place (``fitness.noise``): null where
            # the evaluator recorded none.
            estimate = AccuracyEstimate.of(result.objectives, metadata)
            entry["stderr"], entry["n"] = estimate.stderr, estimate.n
            detail.pop("stderr", None)
            detail.pop("n", None)
        if detail:
            entry["details"] = detail
        entries[objective.name] = entry
    return entries


# ---------------------------------------------------------------------- the files
def _recipe_yaml(info: _Exported) -> str:
    # Hash, run and model are comments: the body stays a bare recipe, which is what
    # `evo-compress evaluate --recipe` and `evo-compress validate` read.
    header = [
        f"# evo-compress recipe {info.short} ({info.origin})",
        f"# hash:  {info.recipe.hash}",
        f"# run:   {info.run_name} ({info.run_dir})",
        f"# model: {info.model}",
        f"# space: {info.space_name}",
        "#",
        "# Re-evaluate it with the run's evaluator and settings (from this folder):",
        f"#   {info.evaluate_command}",
        f"# Its objectives, and how each was obtained: {OBJECTIVES_FILE}.",
    ]
    if info.row.generation < 0:
        header.append("# (The run's baseline reference: a recipe of the run's base space.)")
    return "\n".join(header) + "\n" + render_recipe_yaml(info.recipe)


def _objectives_json(info: _Exported) -> dict[str, Any]:
    evaluation = info.evaluation
    data: dict[str, Any] = {
        "run": info.run_name,
        "run_dir": str(info.run_dir),
        "individual": info.row.id,
        "generation": info.row.generation,
        "hash": info.recipe.hash,
        "model": info.model,
        "evaluator": info.evaluator,
        "fingerprint": info.fingerprint,
        "status": evaluation.result.status,
        "source": evaluation.source,
        "duration_s": evaluation.result.duration_s,
        "feasible": info.feasible,
        "constraints": info.constraints,
        "on_front": info.on_front,
        "objectives": objective_entries(info),
    }
    tasks = task_entries(evaluation.result.metadata)
    if tasks:  # each task's score, stderr, n, metric, weight (the accuracy is their mean)
        data["tasks"] = tasks
    note = evaluation.result.metadata.get("note")
    if note:
        data["note"] = note
    return data


def llmcompressor_recipe(step: QuantStep) -> dict[str, Any]:
    """llm-compressor's YAML recipe form of a quantization step: one stage whose modifier group
    maps modifier class names to their arguments, in the order oneshot applies them."""
    modifiers: dict[str, Any] = {}
    try:
        described = describe_recipe(step.scheme, step.algorithm, step.group_size)
    except JobError as exc:  # the compile rules only make valid steps
        raise EvoCompressError(
            f"cannot describe quantization step {step.to_json()}: {exc}"
        ) from None
    for item in described:
        assert item["class"] not in modifiers, described
        modifiers[item["class"]] = item["kwargs"]
    return {"quant_stage": {"quant_modifiers": modifiers}}


def _llmcompressor_yaml(info: _Exported, step: QuantStep) -> str:
    group = f", groups of {step.group_size}" if step.group_size is not None else ""
    lines = _comment(
        f"llm-compressor recipe of the quantization step of evo-compress recipe {info.short} "
        f"({info.origin}): {step.scheme} by {step.algorithm}{group}; lm_head stays 16-bit. "
        "Written for llm-compressor 0.14. Apply it to the model with calibration text, e.g."
    )
    lines += [
        "#   from llmcompressor import oneshot",
        f'#   oneshot(model="{info.model}", recipe="{LLMCOMPRESSOR_FILE}", dataset=...,',
        '#           output_dir="checkpoint")',
        f"# then serve the folder it writes: ./{SERVE_FILE} checkpoint",
    ]
    steps = info.weight_steps
    if steps:
        lines.append("#")
        lines += _comment(
            f"Pruning / recovery genes ({', '.join(steps)}) have no llm-compressor equivalent "
            "here: this recipe alone would quantize the unpruned, untrained model. Build the "
            "checkpoint with evo-compress instead, which prunes / trains first and then runs "
            f"this step ({_CHECKPOINT_BUILDER}, as the `vllm` evaluator does)."
        )
    body = yaml.safe_dump(llmcompressor_recipe(step), sort_keys=False)
    return "\n".join(lines) + "\n" + body


def _comment(text: str) -> list[str]:
    """``text`` as ``#`` comment lines within the line length."""
    return textwrap.wrap(
        text,
        width=99,
        initial_indent="# ",
        subsequent_indent="# ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _checkpoint_advice(info: _Exported, plan: ServePlan) -> str:
    """Which model folder to serve."""
    if info.weight_steps:
        return (
            f"the checkpoint evo-compress builds ({_CHECKPOINT_BUILDER}): pruning / recovery "
            f"({', '.join(info.weight_steps)})"
            + (", then the quantization step" if plan.quant_step is not None else "")
        )
    if plan.quant_step is not None:
        return f"the folder llm-compressor writes with {LLMCOMPRESSOR_FILE} (from {info.model})"
    return f"the base model itself, {info.model}"


def _serve_sh(info: _Exported, plan: ServePlan) -> str:
    lines = [
        "#!/usr/bin/env bash",
        f"# Serve evo-compress recipe {info.short} ({info.origin}) with vLLM.",
        f"# Engine arguments compiled for vLLM {info.caps.version_text}"
        + (
            f", GPU compute capability {info.caps.compute_capability[0]}."
            f"{info.caps.compute_capability[1]}."
            if info.caps.compute_capability is not None
            else " (the GPU's kernels are not checked here)."
        ),
        "#",
        f"# Usage: ./{SERVE_FILE} CHECKPOINT_FOLDER [more vllm serve arguments]",
        *_comment(f"CHECKPOINT_FOLDER: {_checkpoint_advice(info, plan)}."),
    ]
    if plan.notes:
        lines.append("#")
        for note in plan.notes:
            lines += _comment(f"Note: {note}")
    lines += ["set -euo pipefail", "", 'model="${1:?checkpoint folder}"', "shift", ""]
    for name, value in sorted(plan.env.items()):
        lines.append(f"export {name}={shlex.quote(value)}")
    command = ['exec vllm serve "$model"']
    for group in _arg_groups(plan.engine_args):
        command.append("  " + " ".join(shlex.quote(arg) for arg in group))
    command.append('  "$@"')
    lines.append(" \\\n".join(command))
    return "\n".join(lines) + "\n"


def _arg_groups(args: Sequence[str]) -> list[list[str]]:
    """Engine arguments one flag (with its values) per line."""
    groups: list[list[str]] = []
    for arg in args:
        if arg.startswith("--") or not groups:
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return groups


def _not_servable(info: _Exported) -> str:
    return (
        f"vLLM cannot serve evo-compress recipe {info.short} ({info.origin}) as it is:\n\n"
        f"{info.unservable}\n\n"
        f"Checked against vLLM {info.caps.version_text}"
        + (" with an llm-compressor environment for quantization" if info.caps.quantizer else "")
        + " by evo_compress/fitness/vllm/compile.py, the rules the `vllm` evaluator serves with.\n"
        f"Its objectives were obtained by the `{info.evaluator}` evaluator ({OBJECTIVES_FILE}).\n"
    )


def _readme(info: _Exported, files: Mapping[str, str]) -> str:
    """README.md of the export, from ``templates/README.md.j2``."""
    objectives = []
    for name, entry in objective_entries(info).items():
        how = str(entry["how"])
        if entry["measured"] is False and how != "synthetic":
            how += " (not measured)"
        value = format_value(entry["value"])
        if entry.get("stderr") is not None:
            value = AccuracyEstimate(entry["value"], entry["stderr"]).text()
            if entry.get("n") is not None:
                how += f" (± one standard error, {entry['n']} items)"
            else:
                how += " (± one standard error)"
        better = "higher" if entry["direction"] == "max" else "lower"
        objectives.append(
            {"name": name, "value": value, "unit": entry["unit"], "better": better, "how": how}
        )
    tasks = [
        {
            "name": name,
            "score": AccuracyEstimate(task["score"], task["stderr"]).text(),
            **{key: format_value(task[key]) for key in ("metric", "n", "weight")},
        }
        for name, task in task_entries(info.evaluation.result.metadata).items()
    ]
    constraints = [
        {
            "name": name,
            "limit": format_value(c["limit"]),
            "value": format_value(c["value"]),
            "verdict": {True: "met", False: "violated", None: "unknown"}[c["satisfied"]],
        }
        for name, c in info.constraints.items()
    ]
    serving: dict[str, Any] = {}
    plan = info.plan
    if plan is not None:
        step = plan.quant_step
        group = "" if step is None or step.group_size is None else f", groups of {step.group_size}"
        env = ", ".join(f"`{k}={v}`" for k, v in sorted(plan.env.items()))
        serving = {
            "serve_command": shlex.join(["vllm", "serve", "CHECKPOINT_FOLDER", *plan.engine_args]),
            "serve_env": f" with {env}" if env else "",
            "checkpoint": _checkpoint_advice(info, plan),
            "quant_step": None if step is None else f"{step.scheme} by {step.algorithm}{group}",
        }
    about = {
        RECIPE_FILE: "the recipe (nested YAML; hash, run and model in its header)",
        OBJECTIVES_FILE: "the objectives with units, how each was obtained, status",
        LLMCOMPRESSOR_FILE: "the llm-compressor recipe of the quantization step",
        SERVE_FILE: "`vllm serve` with the recipe's engine arguments",
        NOT_SERVABLE_FILE: "why vLLM cannot serve the recipe",
        README_FILE: "this summary",
    }
    return _readme_template().render(
        info=info,
        recipe=render_recipe(info.recipe),
        recipe_yaml=render_recipe_yaml(info.recipe).rstrip(),
        objectives=objectives,
        tasks=tasks,
        note=info.evaluation.result.metadata.get("note"),
        constraints=constraints,
        plan=plan,
        **serving,
        files=[(name, about[name]) for name in (*files, README_FILE)],
        serve_file=SERVE_FILE,
        not_servable_file=NOT_SERVABLE_FILE,
        llmcompressor_file=LLMCOMPRESSOR_FILE,
        checkpoint_builder=_CHECKPOINT_BUILDER,
    )


@functools.lru_cache(maxsize=1)
def _readme_template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("evo_compress.runs", "templates"),
        autoescape=False,  # Markdown: table cells go through `cell`, the rest as it is
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["cell"] = _table_cell
    return environment.get_template(_README_TEMPLATE)


def _table_cell(value: Any) -> str:
    """``value`` as a Markdown table cell: a ``|`` would end the cell, so it is escaped."""
    return str(value).replace("|", "\\|")


# ---------------------------------------------------------------------- writing
def _write(out: Path, files: Mapping[str, str], force: bool) -> list[Path]:
    if out.exists() and not out.is_dir():
        raise EvoCompressError(f"export folder {out} exists and is not a folder")
    existing = [
        name
        for name in EXPORT_FILES
        if (out / name).exists() and (not (out / name).is_file() or (out / name).stat().st_size)
    ]
    if existing and not force:
        raise EvoCompressError(
            f"{out} already holds {', '.join(existing)}; pass --force to overwrite"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in EXPORT_FILES:
            path = out / name
            if name not in files and (path.is_file() or path.is_symlink()):
                path.unlink()  # a stale file of an earlier export
        written = []
        for name, text in files.items():
            path = out / name
            if path.is_symlink():
                path.unlink()  # write a file here, never through a link elsewhere
            path.write_text(text)
            if name == SERVE_FILE:
                path.chmod(0o755)
            written.append(path)
    except OSError as exc:
        raise EvoCompressError(f"cannot write export to {out}: {exc}") from None
    return written
