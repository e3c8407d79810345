"""Hostile input to `validate`, `run` and `evaluate`: every file, byte and value ends in one
`error:` line naming the field, and exit code 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evo_compress.testing import invoke_cli


def one_line_error(result: tuple[int, str, str], *fragments: str) -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    one_line_error(invoke_cli("validate", path), "latin1.yaml", "UTF-8", "0xe9")
    one_line_error(invoke_cli("run", "--config", path), "latin1.yaml", "UTF-8")
    one_line_error(invoke_cli("evaluate", "-c", path, "-r", "{}"), "latin1.yaml", "UTF-8")


def test_a_recipe_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"quant: {method: \xff}\n")
    config = tmp_path / "c.yaml"
    config.write_text("evaluator: {name: synthetic}\ncache: {enabled: false}\n")
    one_line_error(invoke_cli("validate", recipe), "r.yaml", "UTF-8", "0xff")
    one_line_error(invoke_cli("evaluate", "-c", config, "-r", recipe), "r.yaml", "UTF-8")
    one_line_error(
        invoke_cli("run", "-c", config, "--recipes", recipe, "--run-dir", tmp_path / "run"),
        "r.yaml",
        "UTF-8",
    )


def test_an_inline_recipe_longer_than_a_file_name_is_read_as_yaml(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("evaluator: {name: synthetic}\ncache: {enabled: false}\n")
    long_value = "x" * 300
    one_line_error(
        invoke_cli("evaluate", "-c", config, "-r", f"{{quant: {{method: {long_value}}}}}"),
        "`quant.method`",
        "xxxxxxxx",
    )
    spaces = "{" + " " * 300 + "quant: {method: awq}}"  # valid, and longer than NAME_MAX
    code, out, err = invoke_cli("evaluate", "-c", config, "-r", spaces, "--no-cache")
    assert code == 0, err
    assert "awq" in out


def test_a_long_recipes_name_in_a_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("search: {recipes: " + "a" * 300 + "}\n")
    one_line_error(invoke_cli("validate", config), "`search.recipes`", "aaaa")


def test_validate_a_directory_is_one_line(tmp_path: Path) -> None:
    one_line_error(invoke_cli("validate", tmp_path), "is a directory")
    one_line_error(invoke_cli("run", "--config", tmp_path), "is a directory")


@pytest.mark.parametrize("depth", [100, 5000])
def test_deep_nesting_is_one_line(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("search: " + "[" * depth + "]" * depth + "\n")
    one_line_error(invoke_cli("validate", path), "nested too deeply")
    one_line_error(invoke_cli("run", "--config", path), "nested too deeply")
    flow = "{a: " * depth + "1" + "}" * depth
    config = tmp_path / "c.yaml"
    config.write_text("evaluator: {name: synthetic}\n")
    one_line_error(invoke_cli("evaluate", "-c", config, "-r", flow), "nested too deeply")


def test_an_alias_bomb_is_refused_not_expanded(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    one_line_error(invoke_cli("validate", path), "too large")


def test_duplicate_keys_name_the_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nsearch:\n  seed: 1\n  seed: 2\n")
    one_line_error(invoke_cli("validate", path), "dup.yaml", "duplicate key `seed`", "line 4")
    one_line_error(invoke_cli("run", "--config", path), "duplicate key `seed`", "line 4")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant: {method: awq}\nquant: {method: nf4}\n")
    one_line_error(invoke_cli("validate", recipe), "duplicate key `quant`", "line 2")


def test_a_merge_key_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        "search:\n  <<: {population_size: 8, generations: 3}\n  generations: 5\n"
        "evaluator: {name: synthetic}\n"
    )
    code, out, err = invoke_cli("validate", path)
    assert code == 0, err
    assert "population 8, 5 generations" in out


@pytest.mark.parametrize("section", ["llm: {concurrency: 2}", "evaluation: {workers: 1}"])
def test_validate_knows_every_config_section(tmp_path: Path, section: str) -> None:
    path = tmp_path / "only.yaml"
    path.write_text(section + "\n")
    code, out, err = invoke_cli("validate", path)
    assert code == 0, err
    assert "valid config" in out


def test_markup_in_a_bad_value_is_printed_as_is(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("model: {dtype: '[/bold]'}\n")
    line = one_line_error(invoke_cli("validate", path), "`model.dtype`")
    assert "[/bold]" in line


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--generations", str(10**12)], ["`--generations", "`search.generations`", str(10**12)]),
        (["--seed", str(2**64)], ["`--seed", "`search.seed`", str(2**64)]),
        (["--workers", "²"], ["`--workers ²`", "`evaluation.workers`", "²"]),
        (["--workers", str(10**30)], ["`--workers", "`evaluation.workers`"]),
        (["--set", "search.population_size=2"], ["`--set search", "`search.population_size`"]),
        (["--set", "search.popsize=9"], ["`--set search.popsize=9`", "unknown key"]),
        (["--set", "search.generations"], ["`--set search.generations`", "KEY=VALUE"]),
        (["--cache", "c.sqlite", "--no-cache"], ["`--cache`", "`--no-cache`"]),
    ],
)
def test_run_flags_are_validated_like_the_config(
    tmp_path: Path, flags: list[str], fragments: list[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"evaluator: {{name: synthetic}}\noutput: {{runs_root: {tmp_path}/runs}}\n")
    one_line_error(invoke_cli("run", "--config", config, *flags), *fragments)
    assert not (tmp_path / "runs").exists()


def test_a_bad_value_in_the_file_is_not_blamed_on_a_flag(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("evaluator: {name: synthetic}\nsearch: {population_size: 2}\n")
    line = one_line_error(
        invoke_cli("run", "--config", config, "--seed", "3"), "`search.population_size`"
    )
    assert line.startswith(f"error: {config}:") and "--seed" not in line


def test_resume_and_evaluate_flags_go_the_same_way(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "evaluator: {name: synthetic}\nsearch: {population_size: 4, generations: 1}\n"
        "cache: {enabled: false}\n"
    )
    code, _, err = invoke_cli("run", "-c", config, "--run-dir", tmp_path / "run")
    assert code == 0, err
    one_line_error(
        invoke_cli("resume", tmp_path / "run", "--generations", str(10**12)),
        "`--generations",
        "`search.generations`",
    )
    one_line_error(
        invoke_cli("evaluate", "-c", config, "-r", "{}", "--set", "evaluation.workers=0"),
        "`--set evaluation.workers=0`",
        "`evaluation.workers`",
    )
    # A flag that is valid reaches the command: the evaluation is made with the set value.
    code, out, err = invoke_cli(
        "evaluate", "-c", config, "-r", "{}", "--set", "evaluator.settings.noise=0", "-f", "json"
    )
    assert code == 0, err
    assert json.loads(out)["metadata"]["accuracy_stderr"] == 0  # the default noise is 0.003
