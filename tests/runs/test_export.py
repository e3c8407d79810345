"""Exporting a recipe of a real (synthetic) run: every file parses, the recipe round-trips,
serve.sh runs `vllm serve` with the compiled arguments, llm-compressor and unservable cases."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from evo_compress.exceptions import EvoCompressError, RunStoreError
from evo_compress.fitness.vllm.compile import VLLMCapabilities, compile_recipe, unsupported_reason
from evo_compress.genomes import SearchSpace
from evo_compress.objectives import OBJECTIVES
from evo_compress.runs import RunStore
from evo_compress.runs.export import export_recipe
from evo_compress.runs.front import load_front
from evo_compress.testing import run_search as run

CAPS = VLLMCapabilities(quantizer=True)
# Genes pinned so every recipe of a run is servable apart from its quantization method.
SERVABLE = {"kv.sliding_window": False, "serve.attention_backend": "auto"}


def pinned_run(config_factory, run_dir: Path, **pins: Any) -> Path:
    space = {"pin": {**SERVABLE, **pins}}
    return run(config_factory(search={"recipes": "baseline", "space": space}), run_dir)


def space_of(store: RunStore) -> SearchSpace:
    return SearchSpace.from_data(store.get_meta("space"))


def plan_of(store: RunStore, ident: int) -> Any:
    space = space_of(store)
    defaults = {name: gene.default for name, gene in space.genes.items()}
    return compile_recipe(store.individual(ident).recipe, CAPS, defaults=defaults)


def fake_vllm(tmp_path: Path) -> dict[str, str]:
    """A `vllm` on PATH that records its arguments as JSON instead of serving."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "vllm"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "open(os.environ['VLLM_ARGS_OUT'], 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    exe.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "VLLM_ARGS_OUT": str(tmp_path / "vllm-args.json"),
    }


def test_awq_export_parses_round_trips_and_serves(config_factory, tmp_path):
    run_dir = pinned_run(config_factory, tmp_path / "awq", **{"quant.method": "awq"})
    with RunStore.open(run_dir) as store:
        member = load_front(store)[0]
        out = tmp_path / "export"
        paths = export_recipe(store, member.id, out)
        row = store.individual(member.id)
        evaluation = store.evaluation(member.id)
        plan = plan_of(store, member.id)
        space = space_of(store)
        fingerprint = store.get_meta("fingerprint")
    assert [p.name for p in paths] == [
        "recipe.yaml",
        "objectives.json",
        "llmcompressor_recipe.yaml",
        "serve.sh",
        "README.md",
    ]
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths)
    assert not (out / "NOT_SERVABLE.txt").exists()

    # recipe.yaml: a bare nested recipe that the run's space reads back to the same hash; the
    # hash, run and model are in its header.
    text = (out / "recipe.yaml").read_text()
    data = yaml.safe_load(text)
    assert data == member.recipe
    assert space.recipe(data).hash == row.hash
    assert re.search(rf"^# hash:\s+{row.hash}$", text, re.M)
    assert re.search(r"^# model:\s+synthetic-7b$", text, re.M)
    assert re.search(rf"^# run:\s+test \({re.escape(str(run_dir.resolve()))}\)$", text, re.M)

    # objectives.json: the stored objectives with units and how each was obtained.
    info = json.loads((out / "objectives.json").read_text())
    assert info["hash"] == row.hash and info["individual"] == member.id
    assert info["status"] == "ok" and info["feasible"] is True and info["on_front"] is True
    assert info["fingerprint"] == fingerprint and info["evaluator"] == "synthetic"
    assert evaluation is not None
    for objective in OBJECTIVES:
        entry = info["objectives"][objective.name]
        assert entry["value"] == evaluation.result.objectives[objective.name]  # type: ignore[index]
        assert entry["unit"] == objective.unit
        assert entry["how"] == "synthetic" and entry["measured"] is False
    # The accuracy's noise: the synthetic `noise` setting, no test items behind it.
    noise = evaluation.result.metadata["settings"]["noise"]
    assert info["objectives"]["accuracy"]["stderr"] == noise > 0
    assert info["objectives"]["accuracy"]["n"] is None

    # llmcompressor_recipe.yaml: llm-compressor's stage / modifier-group / class layout, AWQ
    # (a transform) before the quantizing modifier, with the recipe's group size.
    lc_text = (out / "llmcompressor_recipe.yaml").read_text()
    lc = yaml.safe_load(lc_text)
    modifiers = lc["quant_stage"]["quant_modifiers"]
    assert list(modifiers) == ["AWQModifier", "QuantizationModifier"]
    weights = modifiers["QuantizationModifier"]["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["strategy"] == "group"
    assert weights["group_size"] == row.recipe["quant.group_size"]
    if row.recipe["prune.method"] != "none" or row.recipe["recovery.method"] != "none":
        assert "no llm-compressor" in lc_text and "checkpoint.py" in lc_text

    # serve.sh: executable, and it runs `vllm serve` with exactly the compiled arguments.
    serve = out / "serve.sh"
    assert stat.S_IMODE(serve.stat().st_mode) == 0o755
    body = serve.read_text()
    assert body.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in body
    assert all(shlex.quote(arg) in body for arg in plan.engine_args)
    env = fake_vllm(tmp_path)
    ckpt = tmp_path / "my checkpoint"
    subprocess.run([str(serve), str(ckpt), "--port", "8001"], env=env, check=True, timeout=60)
    argv = json.loads(Path(env["VLLM_ARGS_OUT"]).read_text())
    assert argv == ["serve", str(ckpt), *plan.engine_args, "--port", "8001"]
    missing = subprocess.run([str(serve)], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "checkpoint folder" in missing.stderr

    readme = (out / "README.md").read_text()
    assert row.hash in readme and "| accuracy |" in readme and "serve.sh" in readme
    accuracy = evaluation.result.objectives["accuracy"]  # type: ignore[index]
    assert f"| accuracy | {accuracy:.3f} ± {noise:.3f} |" in readme


def test_the_header_command_re_evaluates_to_the_same_objectives(config_factory, tmp_path):
    run_dir = run(config_factory(search={"seed": 1}), tmp_path / "run")
    with RunStore.open(run_dir) as store:
        member = load_front(store)[0]
        export_recipe(store, member.id, tmp_path / "export")
    header = (tmp_path / "export" / "recipe.yaml").read_text()
    match = re.search(r"^#\s+(evo-compress evaluate .*)$", header, re.M)
    assert match, header
    args = shlex.split(match.group(1))
    assert args[:2] == ["evo-compress", "evaluate"]
    proc = subprocess.run(
        [sys.executable, "-m", "evo_compress.cli", *args[1:], "--format", "json"],
        cwd=tmp_path / "export",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["recipe"] == member.recipe
    assert again["objectives"] == member.objectives  # the synthetic landscape is deterministic


def test_every_front_recipe_exports_what_vllm_can_do_with_it(config_factory, tmp_path):
    # An unpinned run: fp8 / int4 / nf4 / none, sliding windows, sdpa... all kinds of recipes.
    run_dir = run(config_factory(search={"seed": 3}), tmp_path / "run")
    seen = {"serve": 0, "not": 0, "llmc": 0}
    with RunStore.open(run_dir) as store:
        space = space_of(store)
        defaults = {name: gene.default for name, gene in space.genes.items()}
        for member in load_front(store):
            recipe = store.individual(member.id).recipe
            out = tmp_path / "export" / str(member.id)
            names = {p.name for p in export_recipe(store, member.id, out)}
            reason = unsupported_reason(recipe, CAPS, defaults=defaults)
            if reason is None:
                plan = compile_recipe(recipe, CAPS, defaults=defaults)
                assert "serve.sh" in names and "NOT_SERVABLE.txt" not in names
                assert ("llmcompressor_recipe.yaml" in names) == (plan.quant_step is not None)
                seen["serve"] += 1
                seen["llmc"] += plan.quant_step is not None
            else:
                assert names == {"recipe.yaml", "objectives.json", "NOT_SERVABLE.txt", "README.md"}
                assert reason in (out / "NOT_SERVABLE.txt").read_text()
                assert reason in (out / "README.md").read_text()
                seen["not"] += 1
    assert seen["serve"] and seen["not"], seen


def test_nf4_is_not_servable_by_current_vllm(config_factory, tmp_path):
    run_dir = pinned_run(config_factory, tmp_path / "nf4", **{"quant.method": "nf4"})
    with RunStore.open(run_dir) as store:
        member = load_front(store)[0]
        paths = export_recipe(store, member.id, tmp_path / "export")
    names = [p.name for p in paths]
    assert names == ["recipe.yaml", "objectives.json", "NOT_SERVABLE.txt", "README.md"]
    why = (tmp_path / "export" / "NOT_SERVABLE.txt").read_text()
    assert "nf4" in why and "bitsandbytes" in why and "0.33.0" in why
    assert not (tmp_path / "export" / "serve.sh").exists()


def test_unknown_and_failed_individuals_are_refused(config_factory, tmp_path):
    config = config_factory(
        evaluator={
            "name": "synthetic",
            "settings": {"fail_if": {"quant.method": ["rtn", "gptq"]}},
        },
        search={"recipes": "aggressive"},
    )
    run_dir = run(config, tmp_path / "run")
    with RunStore.open(run_dir) as store:
        with pytest.raises(RunStoreError, match="no individual 99999"):
            export_recipe(store, 99999, tmp_path / "x")
        failed = [i for i, row in store.evaluations().items() if row.result.status == "failed"]
        assert failed
        with pytest.raises(
            RunStoreError,
            match=rf"individual {failed[0]} has no successful evaluation \(status: failed: "
            "synthetic failure injected",
        ):
            export_recipe(store, failed[0], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_existing_files_are_kept_unless_forced(config_factory, tmp_path):
    awq_dir = pinned_run(config_factory, tmp_path / "awq", **{"quant.method": "awq"})
    nf4_dir = pinned_run(config_factory, tmp_path / "nf4", **{"quant.method": "nf4"})
    out = tmp_path / "export"
    out.mkdir()
    (out / "recipe.yaml").touch()  # an empty file is not an export to protect
    (out / "notes.txt").write_text("mine")
    with RunStore.open(awq_dir) as store:
        awq_id = load_front(store)[0].id
        export_recipe(store, awq_id, out)
        before = (out / "objectives.json").read_text()
        with pytest.raises(
            EvoCompressError, match=r"already holds recipe\.yaml, objectives\.json"
        ):
            export_recipe(store, awq_id, out)
    assert (out / "objectives.json").read_text() == before
    # Forced, a different (unservable) recipe replaces the export: no stale serve.sh or
    # llm-compressor recipe stays behind; files that are not the export's are left alone.
    with RunStore.open(nf4_dir) as store:
        nf4_id = load_front(store)[0].id
        paths = export_recipe(store, nf4_id, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in paths] + ["notes.txt"])
    assert not (out / "serve.sh").exists() and not (out / "llmcompressor_recipe.yaml").exists()
    assert json.loads((out / "objectives.json").read_text())["individual"] == nf4_id
    assert (out / "notes.txt").read_text() == "mine"
