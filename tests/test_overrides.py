"""Flags as dotted overrides: applied to the config data and validated once."""

from __future__ import annotations

import pytest

from evo_compress.exceptions import ConfigError
from evo_compress.overrides import Override, apply_overrides, describe


def test_overrides_set_nested_keys_and_leave_the_data_alone() -> None:
    data = {"search": {"seed": 1}, "cache": None}
    config = apply_overrides(
        data,
        [
            Override("search.seed", 9, "--seed 9"),
            Override("cache.enabled", False, "--no-cache"),
            Override.parse("evaluator.settings.noise=0.5"),
        ],
        "c.yaml",
    )
    assert config.search.seed == 9 and config.cache.enabled is False
    assert config.evaluator.settings == {"noise": 0.5}
    assert data == {"search": {"seed": 1}, "cache": None}  # the caller's data is not changed


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("search.generations=7", "search.generations", 7),
        ("evaluation.workers=auto", "evaluation.workers", "auto"),
        ("cache.path=null", "cache.path", None),
        ("model.id=a=b", "model.id", "a=b"),
        ("name={x: 1}", "name", "{x: 1}"),  # one scalar: a mapping stays text
    ],
)
def test_parse_reads_one_yaml_scalar(text: str, path: str, value: object) -> None:
    override = Override.parse(text)
    assert (override.path, override.value, override.flag) == (path, value, f"--set {text}")


@pytest.mark.parametrize("text", ["search.generations", "=3", "search..seed=1"])
def test_parse_rejects_what_is_not_key_value(text: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        Override.parse(text)


def test_the_error_names_the_flag_that_set_the_bad_value() -> None:
    overrides = [Override("search.generations", 10**12, "--generations 1000000000000")]
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, overrides, "c.yaml")
    assert str(info.value).startswith("`--generations 1000000000000`: `search.generations`")
    with pytest.raises(ConfigError) as info:
        apply_overrides({"search": {"seed": -1}}, overrides[:0], "c.yaml")
    assert str(info.value).startswith("c.yaml: `search.seed`")


def test_a_section_the_file_got_wrong_is_reported_as_the_file_s() -> None:
    with pytest.raises(ConfigError, match=r"^c\.yaml: `search` must be a mapping"):
        apply_overrides({"search": 3}, [Override("search.seed", 1, "--seed 1")], "c.yaml")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        apply_overrides([1], [], "c.yaml")


def test_describe_lists_each_flag_once() -> None:
    flag = "--cache c.db"
    overrides = [Override("cache.enabled", True, flag), Override("cache.path", "c.db", flag)]
    assert describe("c.yaml", overrides) == "c.yaml with --cache c.db"
    assert describe("c.yaml", []) == "c.yaml"
