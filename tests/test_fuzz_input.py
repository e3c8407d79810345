"""Fuzzing configs and recipes through the command line's own entry points (in process):
whatever the bytes, `validate` and `evaluate` end with exit code 0, 1 or 2, an error is one
`error:` line, and nothing escapes as a traceback. Seeded: a failure replays."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from evo_compress.genomes import SearchSpace, builtin_portfolios
from evo_compress.testing import invoke_cli, samples

ROOT = Path(__file__).resolve().parents[1]
CASES = 160  # per entry point; the file runs in a few seconds

ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    -(10**30),
    10**30,
    2**63,
    2**64 + 1,
    float("nan"),
    float("inf"),
    float("-inf"),
    1e300,
    -1e-300,
    "",
    "x" * 100_000,
    "ünïcødé ☃ \u202e\u0301",
    "[/bold] [red]",
    "a\x00b",
    "../../etc/passwd",
    "2:4",
    [],
    {},
    [1, [2, [3]]],
    {"nested": {"deeper": [None]}},
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


def _set(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def _deep(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def mutate_data(data: Any, rng: random.Random) -> Any:
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(data)
        path = rng.choice(paths)
        kind = rng.randrange(6)
        if kind == 0 and path:  # delete a key or an item
            parent = data
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
        elif kind == 1:  # an odd value of another type, size or sign
            data = _set(data, path, copy.deepcopy(rng.choice(ODD_VALUES)))
        elif kind == 2:  # a number nudged out of its range
            data = _set(data, path, rng.choice([-1, 0, 3, 10**8, 2**63, -0.5, 1e12]))
        elif kind == 3:
            data = _set(data, path, _deep(rng.choice([10, 70, 150])))
        elif kind == 4 and isinstance(data, dict):  # an unknown or mistyped key
            data[rng.choice(["extra", "modle", "ünï", "search.seed", 7])] = 1
        elif kind == 5 and path:  # a key's value swapped for another key's value
            other = rng.choice(paths)
            if other and not (path[: len(other)] == other or other[: len(path)] == path):
                value = copy.deepcopy(_get(data, other))
                data = _set(data, path, value)
    return data


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


def mutate_text(text: bytes, rng: random.Random) -> bytes:
    lines = text.splitlines(keepends=True) or [b"\n"]
    kind = rng.randrange(5)
    i = rng.randrange(len(lines))
    if kind == 0:  # not UTF-8
        bad = rng.choice([b"\xff", b"\xe9", b"\xc3("])
        lines[i] = lines[i][: len(lines[i]) // 2] + bad + b"\n"
    elif kind == 1:  # a key given twice
        lines.insert(i, lines[i])
    elif kind == 2:  # cut short
        return text[: rng.randrange(len(text) + 1)]
    elif kind == 3:  # a random byte
        pos = rng.randrange(len(text) + 1)
        return text[:pos] + bytes([rng.randrange(256)]) + text[pos:]
    else:  # a deep flow collection
        lines[i] = b"k: " + b"[" * 3000 + b"]" * 3000 + b"\n"
    return b"".join(lines)


def _dump(data: Any) -> bytes:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False).encode()


def generate(seeds: list[Any], rng: random.Random) -> bytes:
    base = rng.choice(seeds)
    if rng.random() < 0.7:
        return _dump(mutate_data(base, rng))
    return mutate_text(_dump(base), rng)


def config_seeds() -> list[Any]:
    return [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "configs").glob("*.yaml"))]


def recipe_seeds() -> list[Any]:
    space = SearchSpace.load("llm-compression")
    recipes: list[Any] = [r for entries in builtin_portfolios().values() for r in entries]
    recipes += [r.to_dict() for r in samples(space, 10, seed=1)]
    return [*recipes, [r for r in recipes[:4]]]


def check(result: tuple[int, str, str]) -> int:
    code, _, err = result
    assert code in (0, 1, 2), err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), err
    return code


def run_cases(
    tmp_path: Path, seeds: list[Any], seed: int, command: Callable[[Path, bytes], Any]
) -> dict[int, int]:
    rng = random.Random(seed)
    codes: dict[int, int] = {}
    for case in range(CASES):
        text = generate(seeds, rng)
        path = tmp_path / f"case{case}.yaml"
        path.write_bytes(text)
        try:
            code = check(command(path, text))
        except BaseException as exc:
            raise AssertionError(f"case {case} (seed {seed}) crashed on {text[:400]!r}") from exc
        codes[code] = codes.get(code, 0) + 1
    return codes


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The configs' relative runs_root and cache paths land in the test's folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EVO_NO_SUCH_KEY", "")


def test_fuzzed_configs_never_escape_validate(tmp_path: Path) -> None:
    codes = run_cases(tmp_path, config_seeds(), 11, lambda path, _: invoke_cli("validate", path))
    assert codes.get(0) and codes.get(2), codes  # the fuzz reaches both ends
    assert not (tmp_path / "runs").exists()


def test_fuzzed_recipes_never_escape_validate_or_evaluate(tmp_path: Path) -> None:
    config = tmp_path / "synthetic.yaml"
    config.write_text("evaluator: {name: synthetic}\ncache: {enabled: false}\n")

    def both(path: Path, text: bytes) -> tuple[int, str, str]:
        check(invoke_cli("validate", path))
        inline = text.decode("utf-8", "replace")
        recipe = inline if len(inline) < 2000 and inline.strip() else str(path)
        return invoke_cli("evaluate", "-c", config, "-r", recipe, "--format", "json")

    codes = run_cases(tmp_path, recipe_seeds(), 12, both)
    assert codes.get(0) and codes.get(2), codes
