"""`evo-compress cache`: list, count and forget fitness cache entries, prune vLLM checkpoints;
a missing or corrupt cache is a one-line error and is neither created nor changed."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from evo_compress.fitness import EvaluationResult, FitnessCache
from evo_compress.fitness.cache_admin import CHECKPOINT_MARKER
from evo_compress.genomes import SearchSpace
from evo_compress.testing import invoke_cli

FP = "f" * 64
OBJECTIVES = {"accuracy": 0.8, "latency": 5.0, "memory": 900.0, "energy": 10.0, "co2": 0.01}
DAY = 86400.0


def recipes() -> dict[str, Any]:
    space = SearchSpace.builtin()
    return {
        name: space.recipe(data)
        for name, data in {
            "ok": {"quant": {"method": "awq"}},
            "recipe": {"quant": {"method": "rtn"}},
            "limit": {"quant": {"method": "fp8"}},
            "environment": {"quant": {"method": "int8_w8a8"}},
            "old": {"quant": {"method": "nf4"}},
        }.items()
    }


def failure(cls: str | None) -> EvaluationResult:
    metadata = {} if cls is None else {"failure_class": cls}
    return EvaluationResult.failure(f"broke ({cls})", metadata)


@pytest.fixture
def filled(tmp_path: Path) -> dict[str, Any]:
    """A cache of one success and one failure of each class; the environment failure, and
    the unclassed `old` one (treated as environment), are a month old."""
    path = tmp_path / "c.sqlite"
    rs = recipes()
    cache = FitnessCache(path)
    cache.put(rs["ok"], FP, EvaluationResult.success(OBJECTIVES, {}))
    for cls in ("recipe", "limit", "environment"):
        cache.put(rs[cls], FP, failure(cls), limits={})
    cache.close()
    db = sqlite3.connect(path)
    db.execute(
        "INSERT INTO entries (recipe_hash, fingerprint, recipe, status, reason, metadata, "
        "duration_s, created_at) VALUES (?, ?, ?, 'failed', 'legacy', '{}', 1.0, ?)",
        (rs["old"].hash, "0" * 64, rs["old"].canonical_json(), time.time() - 30 * DAY),
    )
    db.execute(
        "UPDATE entries SET created_at = ? WHERE recipe_hash = ?",
        (time.time() - 30 * DAY, rs["environment"].hash),
    )
    db.commit()
    db.close()
    return {"path": path, "recipes": rs}


def cli(*args: Any) -> tuple[int, str, str]:
    return invoke_cli("cache", *args)


def as_json(*args: Any) -> Any:
    code, out, err = cli(*args, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def hashes(path: Path, *filters: str) -> set[str]:
    return {row["recipe_hash"] for row in as_json("ls", "--cache", path, *filters)}


def test_ls_lists_every_entry_with_its_class(filled: dict[str, Any]) -> None:
    rs = filled["recipes"]
    rows = as_json("ls", "--cache", filled["path"])
    by_hash = {row["recipe_hash"]: row for row in rows}
    assert set(by_hash) == {r.hash for r in rs.values()}
    assert by_hash[rs["ok"].hash]["status"] == "ok"
    assert by_hash[rs["ok"].hash]["failure_class"] is None
    assert by_hash[rs["ok"].hash]["objectives"] == OBJECTIVES
    assert by_hash[rs["ok"].hash]["recipe"]["quant"]["method"] == "awq"
    for cls in ("recipe", "limit", "environment"):
        assert by_hash[rs[cls].hash]["failure_class"] == cls
    assert by_hash[rs["old"].hash]["failure_class"] == "environment"  # unclassed
    assert rows[0]["recipe_hash"] in {rs["old"].hash, rs["environment"].hash}  # oldest first
    assert rows[0]["created_at"].endswith("Z")

    code, out, err = cli("ls", "--cache", filled["path"])
    assert code == 0, err
    assert rs["ok"].short_hash in out and "quant=awq" in out and "limit" in out
    assert FP[:12] in out


def test_ls_filters(filled: dict[str, Any]) -> None:
    rs, path = filled["recipes"], filled["path"]
    failed = {rs[k].hash for k in ("recipe", "limit", "environment", "old")}
    assert hashes(path, "--failed") == failed
    assert hashes(path, "--class", "environment") == {rs["environment"].hash, rs["old"].hash}
    assert hashes(path, "--recipe", rs["ok"].short_hash[:8]) == {rs["ok"].hash}


def test_stats_counts_entries_classes_and_hits(filled: dict[str, Any]) -> None:
    path, rs = filled["path"], filled["recipes"]
    info = as_json("stats", "--cache", path)
    assert info["entries"] == 5
    assert info["by_status"] == {"failed": 4, "ok": 1}
    assert info["by_failure_class"] == {"environment": 2, "limit": 1, "recipe": 1}
    assert info["fingerprints"] == 2
    assert info["file_bytes"] > 0
    assert info["oldest"] < info["newest"]
    assert info["hits"] == 0 and info["entries_hit"] == 0

    cache = FitnessCache(path)
    assert cache.get(rs["ok"], FP) is not None
    assert cache.get(rs["ok"], FP) is not None
    assert cache.get(rs["recipe"], FP, {}) is not None
    assert cache.get(rs["environment"], FP, {}) is None  # not served: no hit
    assert cache.get(rs["ok"], "other") is None
    cache.close()
    info = as_json("stats", "--cache", path)
    assert info["hits"] == 3 and info["entries_hit"] == 2
    ok_row = next(r for r in as_json("ls", "--cache", path) if r["recipe_hash"] == rs["ok"].hash)
    assert ok_row["hits"] == 2

    code, out, err = cli("stats", "--cache", path)
    assert code == 0, err
    assert "entries: 5 (4 failed, 1 ok)" in out and "hits: 3" in out


def test_an_older_cache_gets_a_hits_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE entries (recipe_hash TEXT NOT NULL, fingerprint TEXT NOT NULL, "
        "recipe TEXT NOT NULL, status TEXT NOT NULL, objectives TEXT, reason TEXT, "
        "metadata TEXT NOT NULL, duration_s REAL NOT NULL, created_at REAL NOT NULL, "
        "PRIMARY KEY (recipe_hash, fingerprint))"
    )
    db.commit()
    db.close()
    # Read-only commands leave it as it is: no hits counted yet.
    assert as_json("stats", "--cache", path)["hits"] is None
    recipe = recipes()["ok"]
    cache = FitnessCache(path)
    cache.put(recipe, FP, EvaluationResult.success(OBJECTIVES, {}))
    assert cache.get(recipe, FP) is not None
    cache.close()
    assert as_json("stats", "--cache", path)["hits"] == 1


@pytest.mark.parametrize(
    ("filters", "left"),
    [
        (["--failed"], {"ok"}),
        (["--class", "recipe"], {"ok", "limit", "environment", "old"}),
        (["--class", "limit"], {"ok", "recipe", "environment", "old"}),
        (["--class", "environment"], {"ok", "recipe", "limit"}),
        (["--older-than", "7"], {"ok", "recipe", "limit"}),
        (["--failed", "--older-than", "7"], {"ok", "recipe", "limit"}),
        (
            ["--class", "recipe", "--older-than", "7"],
            {"ok", "recipe", "limit", "environment", "old"},
        ),
        (["--all"], set()),
    ],
)
def test_forget_filters_combine(
    filled: dict[str, Any], filters: list[str], left: set[str]
) -> None:
    path, rs = filled["path"], filled["recipes"]
    data = as_json("forget", "--cache", path, *filters)
    assert data["entries_removed"] == 5 - len(left)
    assert hashes(path) == {rs[k].hash for k in left}


def test_forget_by_recipe_prefix_and_dry_run(filled: dict[str, Any]) -> None:
    path, rs = filled["path"], filled["recipes"]
    prefix = rs["limit"].short_hash[:10].upper()  # as typed, either case
    assert (
        as_json("forget", "--cache", path, "--recipe", prefix, "--dry-run")["entries_removed"] == 1
    )
    assert len(hashes(path)) == 5
    code, out, err = cli("forget", "--cache", path, "--recipe", prefix)
    assert code == 0, err
    assert "removed 1 entries" in out
    assert rs["limit"].hash not in hashes(path) and len(hashes(path)) == 4


def test_forget_needs_a_filter(filled: dict[str, Any]) -> None:
    path = filled["path"]
    before = path.read_bytes()
    for args in ([], ["--all", "--failed"], ["--class", "bogus"], ["--checkpoint-dir", "x"]):
        code, out, err = cli("forget", "--cache", path, *args)
        assert code == 2 and out == ""
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert path.read_bytes() == before


@pytest.mark.parametrize("command", ["ls", "stats", "forget"])
def test_a_missing_cache_is_an_error_and_is_not_created(tmp_path: Path, command: str) -> None:
    path = tmp_path / "nowhere" / "c.sqlite"
    code, out, err = cli(command, "--cache", path, *(["--all"] if command == "forget" else []))
    assert code == 2 and out == ""
    assert "no fitness cache" in err and len(err.strip().splitlines()) == 1
    assert not path.parent.exists()


def test_the_default_cache_is_under_runs_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("stats")
    assert code == 2 and "runs/.cache/fitness.sqlite" in err
    assert not (tmp_path / "runs").exists()
    FitnessCache(tmp_path / "runs" / ".cache" / "fitness.sqlite").close()
    assert as_json("stats")["entries"] == 0


@pytest.mark.parametrize("kind", ["garbage", "other-db", "empty"])
@pytest.mark.parametrize("command", ["ls", "stats", "forget"])
def test_a_corrupt_cache_is_an_error_and_is_left_unchanged(
    tmp_path: Path, kind: str, command: str
) -> None:
    path = tmp_path / "c.sqlite"
    if kind == "garbage":
        path.write_bytes(b"not a database " * 500)
    elif kind == "other-db":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE entries (x INTEGER)")
        db.execute("INSERT INTO entries VALUES (1)")
        db.commit()
        db.close()
    else:
        path.write_bytes(b"")
    before = path.read_bytes()
    code, out, err = cli(command, "--cache", path, *(["--all"] if command == "forget" else []))
    assert code == 2 and out == ""
    assert err.startswith("error: fitness cache") and len(err.strip().splitlines()) == 1, err
    assert path.read_bytes() == before


def make_checkpoint(root: Path, name: str, size: int, age_days: float = 0.0) -> Path:
    folder = root / name
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "model.safetensors").write_bytes(b"\0" * size)
    (folder / CHECKPOINT_MARKER).write_text("{}")
    stamp = time.time() - age_days * DAY
    os.utime(folder, (stamp, stamp))
    return folder


def test_forget_checkpoints_prunes_only_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "vllm-checkpoints"
    old = make_checkpoint(root, "a" * 24, 1000, age_days=10)
    new = make_checkpoint(root, "b" * 24, 500)
    building = root / ".cccc-tmp" / "final"  # a build in progress: no marker on top
    building.mkdir(parents=True)
    stranger = root / "notes"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / CHECKPOINT_MARKER).write_text("{}")
    (root / "link").symlink_to(outside, target_is_directory=True)

    data = as_json("forget", "--checkpoints", "--checkpoint-dir", root, "--older-than", "7")
    assert data["checkpoints"]["removed"] == 1
    assert data["checkpoints"]["bytes_freed"] >= 1000
    assert not old.exists() and new.exists()

    code, out, err = cli("forget", "--checkpoints", "--checkpoint-dir", root, "--all")
    assert code == 0, err
    assert "removed 1 checkpoints" in out
    assert not new.exists()
    assert building.is_dir() and (stranger / "keep.txt").read_text() == "mine"
    assert (outside / CHECKPOINT_MARKER).is_file() and (root / "link").is_symlink()


def test_forget_checkpoints_needs_a_filter_and_takes_no_entry_filter(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    kept = make_checkpoint(root, "a" * 24, 10)
    for args in ([], ["--failed", "--all"], ["--recipe", "ab", "--all"]):
        code, out, err = cli("forget", "--checkpoints", "--checkpoint-dir", root, *args)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("forget", "--checkpoints", "--checkpoint-dir", tmp_path / "no", "--all")
    assert code == 2 and "no such folder" in err
    assert kept.exists()


def test_forget_checkpoints_default_folder_honours_evo_compress_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVO_COMPRESS_CACHE", str(tmp_path))
    data = as_json("forget", "--checkpoints", "--all", "--dry-run")
    assert data["checkpoints"]["exists"] is False and data["checkpoints"]["removed"] == 0
    checkpoint = make_checkpoint(tmp_path / "vllm-checkpoints", "d" * 24, 10)
    data = as_json("forget", "--checkpoints", "--all", "--dry-run")
    assert data["checkpoints"]["removed"] == 1 and checkpoint.exists()


def test_the_marker_is_the_vllm_back_ends() -> None:
    from evo_compress.fitness.vllm.checkpoint import MARKER

    assert CHECKPOINT_MARKER == MARKER
