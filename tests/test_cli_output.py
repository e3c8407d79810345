"""Every command that prints data takes `--format json`: one valid JSON document on stdout,
nothing else there, carrying the same facts as the table people read."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from evo_compress.output import fmt
from evo_compress.testing import invoke_cli


def strict_json(text: str) -> Any:
    """One JSON document, as a strict parser reads it: no NaN or Infinity, nothing after it."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def ok(*args: Any) -> str:
    code, out, err = invoke_cli(*args)
    assert code == 0, err
    return out


def as_json(*args: Any) -> Any:
    return strict_json(ok(*args, "--format", "json"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("output")
    config = root / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "out",
                "search": {"population_size": 4, "generations": 2, "seed": 3},
                "evaluator": {"name": "synthetic"},
                "cache": {"enabled": False},
                "constraints": {"max_latency_ms": 9.0},
            }
        )
    )
    code, out, err = invoke_cli("run", "-c", config, "--run-dir", root / "a", "--format", "json")
    assert code == 0, err
    (root / "run_a.json").write_text(out)
    (root / "run_a.err").write_text(err)
    ok("run", "-c", config, "--run-dir", root / "b", "--seed", "4")
    return {"root": root, "config": config, "a": root / "a", "b": root / "b"}


def test_run_prints_the_front_as_json_and_its_progress_on_stderr(runs: dict[str, Path]) -> None:
    data = strict_json((runs["root"] / "run_a.json").read_text())
    assert "generation 1:" in (runs["root"] / "run_a.err").read_text()
    assert data["run_dir"] == str(runs["a"].resolve())
    front = as_json("front", runs["a"])
    assert data["front"] == front and front
    table = ok("front", runs["a"])  # the table lists the same members with the same values
    for member in front:
        assert re.search(rf"│ +{member['id']} │", table)
        assert fmt(member["objectives"]["latency"]) in table


def test_resume_prints_the_front_as_json(runs: dict[str, Path]) -> None:
    copy = runs["root"] / "a-copy"
    shutil.copytree(runs["a"], copy)
    code, out, err = invoke_cli("resume", copy, "--generations", "3", "--format", "json")
    assert code == 0, err
    data = strict_json(out)
    assert data["front"] == as_json("front", copy)
    assert "generation 2:" in err and "generation 2:" not in out
    assert as_json("status", copy)["generations_done"] == 3


def test_status(runs: dict[str, Path]) -> None:
    info = as_json("status", runs["a"])
    table = ok("status", runs["a"])
    assert f"generations: {info['generations_done']} of {info['generations_target']}" in table
    assert f"state: {info['state']}" in table
    assert f"evaluations: {info['evaluations']} " in table
    assert f"front: {info['front_size']} recipes, hypervolume {info['hypervolume']:.4f}" in table
    assert info["hv_box"] is not None and "hypervolume box:" in table


def test_history(runs: dict[str, Path]) -> None:
    rows = as_json("history", runs["a"])
    table = ok("history", runs["a"])
    assert [row["generation"] for row in rows] == [0, 1]
    for row in rows:
        assert f"{row['hypervolume']:.4f}" in table


def test_lineage(runs: dict[str, Path]) -> None:
    graph = as_json("lineage", runs["a"])
    table = ok("lineage", runs["a"])
    assert ok("lineage", runs["a"], "--format", "tree") == table
    for root in graph["roots"]:
        assert f"#{root} " in table


def test_operators(runs: dict[str, Path]) -> None:
    rows = as_json("operators", runs["a"])
    table = ok("operators", runs["a"])
    assert rows and all(row["operator"] in table for row in rows)


def test_report_and_export_list_what_they_wrote(runs: dict[str, Path]) -> None:
    out = runs["root"] / "report.html"
    report = as_json("report", runs["a"], "--out", out, "--no-png")
    assert report == {"report": str(out), "plots": []} and out.is_file()
    assert ok("report", runs["a"], "--out", out, "--no-png").strip() == f"report: {out}"
    # By default the PNG plots too, beside the HTML file.
    report = as_json("report", runs["a"], "--out", out)
    assert report["plots"] and all(Path(p).parent == out.parent for p in report["plots"])
    assert ok("report", runs["a"], "--out", out).splitlines()[1:] == [
        f"plot: {p}" for p in report["plots"]
    ]

    ident = as_json("front", runs["a"])[0]["id"]
    first = as_json("export", runs["a"], str(ident), "--out", runs["root"] / "x")
    table = ok("export", runs["a"], str(ident), "--out", runs["root"] / "y")
    assert first["id"] == ident and first["files"]
    assert [Path(p).name for p in first["files"]] == [
        Path(line).name for line in table.splitlines()
    ]
    assert all(Path(p).is_file() for p in first["files"])


def test_compare(runs: dict[str, Path]) -> None:
    result = as_json("compare", runs["a"], runs["b"])
    table = ok("compare", runs["a"], runs["b"])
    assert f"{result['a']['hypervolume']:.6g}" in table
    assert f"{result['b']['hypervolume']:.6g}" in table
    assert "_front" not in result["a"]


def test_validate_a_config_and_a_recipe_file(runs: dict[str, Path]) -> None:
    found = as_json("validate", runs["config"])
    line = ok("validate", runs["config"])
    assert found["kind"] == "config" and found["name"] == "out"
    assert f"valid config `{found['name']}`" in line and f"{found['genes']} genes" in line

    recipes = runs["root"] / "seeds.yaml"
    recipes.write_text("- {quant: {method: awq, group_size: 64}}\n- {}\n")
    found = as_json("validate", recipes)
    table = ok("validate", recipes)
    assert found["kind"] == "recipes" and len(found["recipes"]) == 2
    for recipe in found["recipes"]:
        assert f"{recipe['hash'][:12]}  {recipe['text']}" in table


def test_evaluate(runs: dict[str, Path]) -> None:
    args = ("evaluate", "-c", runs["config"], "-r", "{quant: {method: awq, group_size: 64}}")
    result = as_json(*args)
    table = ok(*args)
    assert result["status"] == "ok"
    for name in ("latency", "memory", "energy"):
        assert fmt(result["objectives"][name]) in table


def test_a_failed_command_prints_no_json(runs: dict[str, Path]) -> None:
    code, out, err = invoke_cli("status", runs["root"] / "nope", "--format", "json")
    assert code == 2 and out == "" and err.startswith("error:")
