"""The command line as a user runs it: real processes, one-line errors, every format."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EXE = [sys.executable, "-m", "evo_compress.cli"]
OBJECTIVES = {"accuracy", "latency", "memory", "energy", "co2"}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_config(tmp_path: Path, **search) -> Path:
    data = {
        "name": "cli",
        "search": {"population_size": 6, "generations": 3, "seed": 5, **search},
        "evaluator": {"name": "synthetic"},
        "output": {"runs_root": str(tmp_path / "runs")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    text = " ".join(lines)
    assert text.startswith("error:")
    for fragment in fragments:
        assert fragment in text


def test_run_then_status_front_and_resume(tmp_path):
    config = write_config(tmp_path)
    run_dir = tmp_path / "run"
    out = cli("run", "--config", config, "--run-dir", run_dir, "--cache", tmp_path / "c.sqlite")
    assert "generation 2:" in out.stdout and "Pareto front" in out.stdout
    assert "synthetic" in out.stdout  # the synthetic evaluator says what it is
    # Its accuracy noise (the `noise` setting, 0.003 by default) is shown as one stderr.
    assert "± 0.003" in out.stdout and "± 0.003" in cli("front", run_dir).stdout

    front = json.loads(cli("front", run_dir, "--format", "json").stdout)
    keys = {"id", "recipe", "objectives", "accuracy_stderr", "accuracy_n", "feasible"}
    assert front and all(set(m) == keys for m in front)
    assert all(set(m["objectives"]) == OBJECTIVES and m["feasible"] for m in front)
    # A synthetic accuracy has a stderr but no test items behind it.
    assert all(m["accuracy_stderr"] == 0.003 and m["accuracy_n"] is None for m in front)

    rows = list(csv.DictReader(io.StringIO(cli("front", run_dir, "--format", "csv").stdout)))
    assert [int(r["id"]) for r in rows] == [m["id"] for m in front]
    assert all(r["accuracy_stderr"] == "0.003" and r["accuracy_n"] == "" for r in rows)

    status = cli("status", run_dir).stdout
    assert "finished" in status and "3 of 3" in status

    more = cli("resume", run_dir, "--generations", "5")
    assert "generation 4:" in more.stdout and "generation 2:" not in more.stdout
    assert "5 of 5" in cli("status", run_dir).stdout


def test_second_run_hits_the_cache(tmp_path):
    config = write_config(tmp_path)
    cli("run", "--config", config, "--run-dir", tmp_path / "a")
    again = cli("run", "--config", config, "--run-dir", tmp_path / "b")
    assert "0 evaluated, 6 cache hits" in again.stdout
    no_cache = cli("run", "--config", config, "--run-dir", tmp_path / "c", "--no-cache")
    assert "6 evaluated, 0 cache hits" in no_cache.stdout


def test_flags_override_the_config(tmp_path):
    config = write_config(tmp_path)
    run_dir = tmp_path / "run"
    cli(
        "run",
        "--config",
        config,
        "--run-dir",
        run_dir,
        "--generations",
        "2",
        "--seed",
        "9",
        "--recipes",
        "aggressive",
        "--no-cache",
    )
    frozen = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert frozen["search"]["generations"] == 2
    assert frozen["search"]["seed"] == 9
    assert frozen["search"]["recipes"] == "aggressive"
    assert frozen["cache"]["enabled"] is False


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("search: {population_size: 1}", ["`search.population_size`", "got 1"]),
        ("search: {popsize: 10}", ["unknown key `search.popsize`"]),
        ("evaluator: {name: synthetc}", ["did you mean `synthetic`"]),
        (
            "search: {operators: {mutation: [{name: flip}]}}",
            ["`search.operators.mutation[0].name`", "flip"],
        ),
        ("search: {space: {pin: {quant.method: int3}}}", ["`quant.method`", "int3"]),
        ("search: [unclosed", ["not valid YAML"]),
    ],
)
def test_bad_configs_fail_with_one_line(tmp_path, content, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert_one_line_error(cli("run", "--config", path, check=False), *fragments)
    assert_one_line_error(cli("validate", path, check=False), *fragments)
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("search: {population_size: 1}")
    proc = cli("--debug", "run", "--config", path, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_debug_details_show_only_with_debug():
    from rich.console import Console

    from evo_compress.cli import _RichProgress

    for debug, shown in ((False, ""), (True, "debug: seed recipe quant=fp8 skipped\n")):
        console = Console(file=io.StringIO(), width=200)
        _RichProgress(console, debug=debug).debug("seed recipe quant=fp8 skipped")
        assert console.file.getvalue() == shown  # type: ignore[attr-defined]


def test_missing_run_dir_and_missing_config(tmp_path):
    assert_one_line_error(cli("status", tmp_path / "nope", check=False), "does not exist")
    assert_one_line_error(cli("resume", tmp_path / "nope", check=False), "does not exist")
    assert_one_line_error(cli("front", tmp_path / "nope", check=False), "does not exist")
    assert_one_line_error(
        cli("run", "--config", tmp_path / "none.yaml", check=False), "does not exist"
    )


def test_bad_recipes_flag_names_the_problem(tmp_path):
    config = write_config(tmp_path)
    proc = cli("run", "--config", config, "--recipes", "agressive", check=False)
    assert_one_line_error(proc, "did you mean `aggressive`")
    recipes = tmp_path / "seeds.yaml"
    recipes.write_text("- {quant: {method: nf4}}\n- {prune: {method: wanda, sparsity: 0.9}}\n")
    proc = cli("run", "--config", config, "--recipes", recipes, check=False)
    assert_one_line_error(proc, "recipe 1", "`prune.sparsity`", "0.9")


def test_validate_accepts_configs_and_recipe_files(tmp_path):
    config = write_config(tmp_path)
    assert "valid config `cli`" in cli("validate", config).stdout
    assert "valid config" in cli("validate", "configs/synthetic.yaml").stdout
    recipes = tmp_path / "seeds.yaml"
    recipes.write_text("- {quant: {method: awq, group_size: 64}}\n- {}\n")
    assert "2 valid recipe(s)" in cli("validate", recipes).stdout
    one = tmp_path / "one.yaml"
    one.write_text("prune: {method: wanda, pattern: 2:4}\n")  # unquoted: YAML reads 124
    assert_one_line_error(cli("validate", one, check=False), "`prune.pattern`", "quotes")


def test_help_explains_every_flag():
    text = cli("run", "--help").stdout
    for flag in (
        "--config",
        "--run-dir",
        "--recipes",
        "--generations",
        "--seed",
        "--cache",
        "--no-cache",
    ):
        assert flag in text
    for command in ("resume", "status", "front", "validate"):
        assert "Usage" in cli(command, "--help").stdout


@pytest.mark.parametrize(
    ("section", "fragments"),
    [
        (
            "search: {operators: {mutation: [{name: gene, params: {step_scale: 0}}]}}",
            ["`search.operators.mutation[0].params`", "step_scale"],
        ),
        (
            "search: {operators: {mutation: [{name: gene, params: {sigma: 1}}]}}",
            ["`search.operators.mutation[0].params`", "sigma"],
        ),
        (
            "evaluator: {name: synthetic, settings: {cost_s: -1}}",
            ["`evaluator.settings.cost_s`", "-1"],
        ),
        ("search: {recipes: nowhere.yaml}", ["`search.recipes`", "nowhere.yaml"]),
    ],
)
def test_validate_catches_what_run_would_reject(tmp_path, section, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(section + "\noutput: {runs_root: " + str(tmp_path / "runs") + "}\n")
    assert_one_line_error(cli("validate", path, check=False), *fragments)
    assert_one_line_error(cli("run", "--config", path, check=False), *fragments)
    assert not (tmp_path / "runs").exists()  # no half-made run directory is left behind


def test_evaluate_one_recipe_as_table_and_json(tmp_path):
    config = write_config(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant: {method: awq, group_size: 64}\n")
    table = cli("evaluate", "--config", config, "--recipe", recipe, "--cache", tmp_path / "c.db")
    assert "accuracy" in table.stdout and "computed, not measured" in table.stdout
    out = json.loads(
        cli(
            "evaluate",
            "-c",
            config,
            "-r",
            "{quant: {method: awq, group_size: 64}}",
            "--format",
            "json",
            "--cache",
            tmp_path / "c.db",
        ).stdout
    )
    assert out["cache_hit"] is True and out["status"] == "ok"
    assert set(out["objectives"]) == OBJECTIVES
    assert out["recipe"]["quant"] == {"method": "awq", "group_size": 64}


def test_evaluate_reports_failures_and_bad_recipes(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "evaluator": {
                    "name": "synthetic",
                    "settings": {"fail_if": {"quant.method": ["rtn"]}},
                },
                "cache": {"enabled": False},
            }
        )
    )
    failed = cli("evaluate", "-c", config, "-r", "{quant: {method: rtn}}", check=False)
    assert failed.returncode == 1 and "failed" in failed.stdout and "fail_if" in failed.stdout
    bad = cli("evaluate", "-c", config, "-r", "{quant: {method: awk}}", check=False)
    assert_one_line_error(bad, "`quant.method`", "awk")
    missing = cli("evaluate", "-c", config, "-r", "nothere.yaml", check=False)
    assert_one_line_error(missing, "nothere.yaml")


def test_run_with_llm_operators_reports_requests_and_missing_keys(tmp_path):
    from evo_compress_doubles.providers import FakeProviderServer, model_like

    with FakeProviderServer(default=model_like()) as server:
        local = {
            "provider": "openai-compatible",
            "base_url": server.base_url("openai-compatible"),
            "model": "local-model",
        }
        remote = {"provider": "anthropic", "model": "claude", "api_key_env": "EVO_NO_SUCH_KEY"}
        config = write_config(
            tmp_path,
            operators={
                "crossover": [{"name": "uniform"}, {"name": "llm", "params": remote}],
                "mutation": [{"name": "expert"}, {"name": "llm", "params": local}],
            },
        )
        run_dir = tmp_path / "run"
        out = cli("run", "--config", config, "--run-dir", run_dir, "--recipes", "llm")
        assert "asking local-model for 6 first-generation recipes" in out.stdout
        assert "no API key" in out.stdout and "EVO_NO_SUCH_KEY" in out.stdout
        assert out.stdout.count("EVO_NO_SUCH_KEY") == 1  # said once
        assert server.requests and all(r.wire == "openai" for r in server.requests)
    status = cli("status", run_dir).stdout
    assert f"LLM requests: {len(server.requests)}" in status and "valid" in status


def test_history_lineage_operators_report_export_and_compare(tmp_path):
    config = write_config(tmp_path)
    cli("run", "--config", config, "--run-dir", tmp_path / "a", "--no-cache")
    cli("run", "--config", config, "--run-dir", tmp_path / "b", "--seed", "9", "--no-cache")
    a = tmp_path / "a"

    history = json.loads(cli("history", a, "--format", "json").stdout)
    assert [row["generation"] for row in history] == [0, 1, 2]
    assert "hypervolume" in cli("history", a).stdout

    front = json.loads(cli("front", a, "--format", "json").stdout)
    graph = json.loads(cli("lineage", a, "--format", "json").stdout)
    assert sorted(graph["roots"]) == sorted(m["id"] for m in front)
    assert cli("lineage", a, str(front[0]["id"]), "--depth", "1").stdout.startswith(
        f"#{front[0]['id']} "
    )
    assert cli("lineage", a, "--format", "dot").stdout.startswith("digraph")
    assert "<graphml" in cli("lineage", a, "--format", "graphml").stdout
    assert_one_line_error(cli("lineage", a, "99999", check=False), "99999")

    stats = json.loads(cli("operators", a, "--format", "json").stdout)
    assert {row["operator"] for row in stats} == {"uniform", "gene"}
    assert "Operators" in cli("operators", a).stdout

    out = cli("report", a, "--png", tmp_path / "png").stdout
    assert (a / "report.html").is_file() and "report:" in out
    assert len(list((tmp_path / "png").glob("*.png"))) == 5

    exported = cli("export", a, str(front[0]["id"]), "--out", tmp_path / "x").stdout
    assert "recipe.yaml" in exported and (tmp_path / "x" / "objectives.json").is_file()
    assert_one_line_error(
        cli("export", a, str(front[0]["id"]), "--out", tmp_path / "x", check=False), "--force"
    )

    compared = json.loads(cli("compare", a, tmp_path / "b", "--format", "json").stdout)
    assert compared["a"]["hypervolume"] > 0 and compared["b"]["hypervolume"] > 0
    assert "common" in cli("compare", a, tmp_path / "b").stdout


@pytest.mark.slow
def test_a_timeout_in_the_cache_is_not_served_to_a_longer_timeout(tmp_path):
    from evo_compress.testing import save_random_llama

    model = save_random_llama(
        tmp_path / "tiny-llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    settings = {"threads": 1, "limit": 8, "latency_prompts": 2, "max_new_tokens": 2}

    def evaluate(timeout_s: float) -> dict:
        config = tmp_path / f"timeout-{timeout_s:g}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model": {"id": str(model)},
                    "hardware": {"device": "cpu"},
                    "evaluator": {
                        "name": "transformers",
                        "settings": {**settings, "timeout_s": timeout_s},
                    },
                }
            )
        )
        recipe = "{serve: {max_num_seqs: 1}}"
        args = ["evaluate", "-c", config, "-r", recipe, "-f", "json", "--cache", tmp_path / "c"]
        return json.loads(cli(*args, check=False).stdout)

    short = evaluate(0.5)
    assert short["status"] == "failed" and short["reason"].startswith("timeout")
    # A longer limit evaluates again: the 0.5 s timeout says nothing about 240 s.
    longer = evaluate(240)
    assert longer["cache_hit"] is False and longer["status"] == "ok", longer["reason"]
    # A success does not depend on the limit it ran under: it serves the short one too.
    again = evaluate(0.5)
    assert again["cache_hit"] is True and again["objectives"] == longer["objectives"]


def test_a_cache_file_that_is_not_a_cache_costs_one_warning_line(tmp_path):
    config = write_config(tmp_path, generations=2)
    bad = tmp_path / "notes.sqlite"
    bad.write_text("my notes, not a cache\n" * 100)
    proc = cli("run", "-c", config, "--cache", bad, "--run-dir", tmp_path / "run")
    warnings = [line for line in proc.stdout.splitlines() if str(bad) in line]
    assert len(warnings) == 1 and "without it" in warnings[0], proc.stdout
    assert "Traceback" not in proc.stderr
    assert bad.read_text() == "my notes, not a cache\n" * 100
