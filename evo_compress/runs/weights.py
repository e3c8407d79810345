"""The compressed model as an output: a folder that ``AutoModelForCausalLM.from_pretrained``
loads (weights, quantization config, tokenizer), with a Hugging Face model card and a JSON
record of how it was made, written whole or not at all.

The weights themselves are made by ``fitness/model/save.py`` (called through ``build``); this
module decides the folder's other files and how it replaces an earlier export.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from evo_compress import __version__
from evo_compress.exceptions import EvoCompressError
from evo_compress.fitness.noise import AccuracyEstimate
from evo_compress.genomes import Recipe, render_recipe, render_recipe_yaml
from evo_compress.text import format_value

PROVENANCE_FILE = "evo_compress_export.json"
CARD_FILE = "README.md"
_LIBRARIES = ("torch", "transformers", "torchao", "bitsandbytes", "peft", "lm_eval")
# Genes that set how the model is served, not its weights: the card lists them apart.
_SERVING_PREFIXES = ("kv.", "serve.")


@dataclass(frozen=True)
class WeightsOrigin:
    """What the exported weights are: the recipe, the model and evaluator settings they were
    rebuilt with, and (for ``export``) the run record whose objectives they reproduce."""

    recipe: Recipe
    model: str
    model_fingerprint: str
    evaluator: str
    settings: Mapping[str, Any]
    device: str
    task: str
    run: Mapping[str, Any] | None = None  # name, dir, individual, generation, search seed
    objectives: Mapping[str, Mapping[str, Any]] | None = None  # as `objectives.json` has them
    tasks: Mapping[str, Mapping[str, Any]] | None = None  # metadata.tasks of the record
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def seed(self) -> int:
        return int(self.settings.get("seed", 0))


def check_target(out: Path, force: bool) -> None:
    """Refuse before any work: ``out`` holds something and ``--force`` was not given, or it
    holds files that are not an earlier weights export (those are never deleted)."""
    if out.exists() and not out.is_dir():
        raise EvoCompressError(f"weights folder {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / PROVENANCE_FILE).is_file():
        raise EvoCompressError(
            f"{out} is not empty and holds no earlier weights export ({PROVENANCE_FILE}); "
            "choose an empty or new folder"
        )
    if not force:
        raise EvoCompressError(f"{out} already holds exported weights; pass --force to overwrite")


def write_weights(
    out: Path,
    origin: WeightsOrigin,
    build: Callable[[Path], dict[str, Any]],
    *,
    force: bool = False,
    message: Callable[[str], None] = lambda _text: None,
) -> list[Path]:
    """Write the weights folder ``out``: ``build(folder)`` saves the model and tokenizer into
    a temporary folder beside ``out`` and returns what it did; the model card and provenance
    record are added and the folder is renamed into place. A failure (or Ctrl-C) leaves
    ``out`` as it was. Returns the files written."""
    out = Path(out)
    check_target(out, force)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.tmp-"))
    except OSError as exc:
        raise EvoCompressError(f"cannot write weights to {out}: {exc}") from None
    try:
        saved = build(tmp)
        message("writing the model card")
        record = provenance(origin, saved)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        (tmp / CARD_FILE).write_text(model_card(origin, saved))
        # mkdtemp (and safetensors) make private files; the export is an ordinary folder.
        tmp.chmod(0o755)
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        _replace(tmp, out)
    except OSError as exc:
        raise EvoCompressError(f"cannot write weights to {out}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(p for p in out.iterdir() if p.is_file())


def _replace(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` (checked by ``check_target``) is moved
    aside first and removed only after the new folder is in place."""
    old: Path | None = None
    if out.exists():
        old = out.resolve().parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- provenance
def _versions() -> dict[str, str]:
    versions = {"evo-compress": __version__, "python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name.replace("_", "-"))
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def provenance(origin: WeightsOrigin, saved: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON record of how the weights were made (``evo_compress_export.json``). Being a
    ``.json`` file of the folder, it also enters the folder's model fingerprint, so two
    exports with weight files of equal sizes are never one cache entry."""
    return {
        "format": 1,
        "recipe": origin.recipe.to_dict(),
        "hash": origin.recipe.hash,
        "base_model": origin.model,
        "base_model_fingerprint": origin.model_fingerprint,
        "evaluator": origin.evaluator,
        "evaluator_settings": dict(origin.settings),
        "device": origin.device,
        "task": origin.task,
        "seed": origin.seed,
        "run": dict(origin.run) if origin.run is not None else None,
        "objectives": origin.objectives,
        "tasks": origin.tasks,
        "versions": _versions(),
        "compression": saved.get("details"),
        "compression_energy": saved.get("compression_energy"),
        "quantization_config": saved.get("quantization_config"),
        "reload_check": saved.get("check"),
        "warnings": list(origin.warnings),
    }


# ---------------------------------------------------------------------- model card
def _is_hub_id(model: str) -> bool:
    return model != "reference" and not Path(model).exists() and model.count("/") == 1


def _tags(recipe: Mapping[str, Any]) -> list[str]:
    tags = ["evo-compress", "compressed"]
    prune = recipe.get("prune.method", "none")
    if prune != "none":
        tags += ["pruned", str(prune)]
    quant = recipe.get("quant.method", "none")
    if quant != "none":
        tags += ["quantized", str(quant)]
    recovery = recipe.get("recovery.method", "none")
    if recovery != "none":
        tags.append(str(recovery))
    return tags


def _task_results(origin: WeightsOrigin) -> list[dict[str, Any]]:
    """``model-index`` results: one per task of the record (``metadata.tasks``), else the one
    accuracy objective; none when nothing was measured (``compress``)."""
    rows: list[tuple[str, str, Any]] = []
    if origin.tasks:
        for name, entry in origin.tasks.items():
            rows.append((name, str(entry.get("metric") or "score"), entry.get("score")))
    elif origin.objectives and "accuracy" in origin.objectives:
        accuracy = origin.objectives["accuracy"]
        metric = str(accuracy.get("how", "")).rsplit(" ", 1)[-1] or "accuracy"
        rows.append((origin.task, metric, accuracy.get("value")))
    return [
        {
            "task": {"type": "text-generation"},
            "dataset": {"name": name, "type": name},
            "metrics": [{"type": metric, "value": value, "name": metric}],
        }
        for name, metric, value in rows
        if value is not None
    ]


def _front_matter(origin: WeightsOrigin) -> str:
    data: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if _is_hub_id(origin.model):
        data["base_model"] = origin.model
    data["tags"] = _tags(origin.recipe)
    results = _task_results(origin)
    if results:
        name = f"evo-compress-{origin.recipe.short_hash}"
        data["model-index"] = [{"name": name, "results": results}]
    return "---\n" + yaml.safe_dump(data, sort_keys=False) + "---\n"


def _cell(value: Any) -> str:
    return format_value(value).replace("|", "\\|").replace("\n", " ")


def model_card(origin: WeightsOrigin, saved: Mapping[str, Any]) -> str:
    """README.md: front matter as Hugging Face model cards have it, then the recipe, the
    measured objectives (per task too) and how the weights were made."""
    recipe = origin.recipe
    run = origin.run
    source = (
        f"the compression recipe of individual {run['individual']} (generation "
        f"{run['generation']}) of evo-compress run `{run['name']}`"
        if run is not None
        else "a compression recipe given by hand (`evo-compress compress`)"
    )
    lines = [
        _front_matter(origin),
        f"# {origin.model}, compressed by evo-compress (recipe {recipe.short_hash})",
        "",
        f"`{origin.model}` with {source}, rebuilt by evo-compress "
        f"{__version__} with seed {origin.seed} and saved for `transformers`.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "## Recipe",
        "",
        render_recipe(recipe),
        "",
        "```yaml",
        render_recipe_yaml(recipe).rstrip(),
        "```",
        "",
        f"Recipe hash: `{recipe.hash}`",
    ]
    serving = {k: v for k, v in recipe.items() if k.startswith(_SERVING_PREFIXES)}
    if serving:
        lines += [
            "",
            "Serving settings of the recipe are not part of the weights; set them where the "
            "model is served: " + ", ".join(f"`{k}={v}`" for k, v in serving.items()) + ".",
        ]
    lines += ["", *_objectives_section(origin), "", *_how_section(origin, saved)]
    if origin.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in origin.warnings]
    return "\n".join(lines) + "\n"


def _objectives_section(origin: WeightsOrigin) -> list[str]:
    if not origin.objectives:
        return [
            "## Objectives",
            "",
            "Not measured: this folder was made from a recipe given by hand. Measure it with "
            "`evo-compress evaluate --config CFG --recipe '{}'` and `model.id` set to this "
            "folder.",
        ]
    lines = [
        "## Measured objectives",
        "",
        f"As measured by the `{origin.evaluator}` evaluator on `{origin.device}` when the run "
        "evaluated this recipe (on the compressed model in memory, before saving).",
        "",
        "| objective | value | unit | better | how it was obtained |",
        "|---|---:|---|---|---|",
    ]
    for name, entry in origin.objectives.items():
        value = format_value(entry.get("value"))
        if entry.get("stderr") is not None:
            value = AccuracyEstimate(entry["value"], entry["stderr"]).text()
        better = "higher" if entry.get("direction") == "max" else "lower"
        how = _cell(entry.get("how"))
        if entry.get("n") is not None:
            how += f" ({entry['n']} items)"
        lines.append(f"| {name} | {value} | {entry.get('unit', '')} | {better} | {how} |")
    if origin.tasks:
        lines += [
            "",
            "Per task:",
            "",
            "| task | score | stderr | items | metric | weight |",
            "|---|---:|---:|---:|---|---:|",
        ]
        for name, entry in origin.tasks.items():
            lines.append(
                f"| {_cell(name)} | {_cell(entry.get('score'))} | {_cell(entry.get('stderr'))} "
                f"| {_cell(entry.get('n'))} | {_cell(entry.get('metric'))} "
                f"| {_cell(entry.get('weight'))} |"
            )
    return lines


def _how_section(origin: WeightsOrigin, saved: Mapping[str, Any]) -> list[str]:
    details = saved.get("details") or {}
    versions = _versions()
    lines = ["## How it was made", ""]
    if origin.run is not None:
        run = origin.run
        lines.append(
            f"- Run: `{run['name']}` (`{run['dir']}`), individual {run['individual']}, "
            f"generation {run['generation']}, search seed {run.get('search_seed')}."
        )
    lines += [
        f"- Base model: `{origin.model}` (fingerprint `{origin.model_fingerprint}`).",
        f"- Evaluator: `{origin.evaluator}` on `{origin.device}`; tasks `{origin.task}`. "
        "Calibration and recovery text as `evaluator.settings.calibration` says (by "
        "default the tasks' own documents).",
        f"- Compression seed (`evaluator.settings.seed`): {origin.seed}; torch threads: "
        f"{origin.settings.get('threads')}.",
    ]
    prune = details.get("prune")
    if prune:
        lines.append(
            f"- Pruning: `{origin.recipe.get('prune.method')}`, measured sparsity "
            f"{format_value(prune.get('sparsity'))}."
        )
    recovery = details.get("recovery")
    if recovery:
        lines.append(
            f"- Recovery: `{origin.recipe.get('recovery.method')}`, {recovery.get('steps')} "
            f"steps, training loss {format_value(recovery.get('loss_first'))} -> "
            f"{format_value(recovery.get('loss_last'))}."
        )
    quant = details.get("quant") or {}
    if quant.get("method") not in (None, "none"):
        lines.append(
            f"- Quantization: `{quant.get('method')}` with {quant.get('library')} "
            f"({quant.get('config')}); storage: {quant.get('storage')}; weights "
            f"{quant.get('weight_bytes')} bytes."
        )
    declared = saved.get("quantization_config")
    if declared:
        lines.append(f"- Saved with quantization config: `{json.dumps(declared, default=str)}`.")
    check = saved.get("check") or {}
    if check:
        lines.append(
            f"- Checked on saving: the folder loads back with the same {check.get('parameters')} "
            f"parameters (class, dtype, shape) and logits within "
            f"{format_value(check.get('max_logit_difference'))} on {check.get('texts')} task "
            "texts."
        )
    lines.append(
        "- Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()) + "."
    )
    lines.append(f"- Everything above as JSON: `{PROVENANCE_FILE}`.")
    return lines


__all__ = [
    "CARD_FILE",
    "PROVENANCE_FILE",
    "WeightsOrigin",
    "check_target",
    "model_card",
    "provenance",
    "write_weights",
]
