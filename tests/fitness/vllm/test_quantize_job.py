"""The llm-compressor quantization job: its recipes as plain data, its argument checks, and
its one-line failures, run as the standalone script it is.

The end-to-end test needs a Python with llm-compressor: ``sys.executable`` when it has one,
else ``$EVO_COMPRESS_QUANTIZER_PYTHON``; skipped otherwise.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from evo_compress.fitness.vllm import quantize_job
from evo_compress.fitness.vllm.quantize_job import JobError, build_recipe, describe_recipe

JOB = Path(quantize_job.__file__)
HAS_LLMCOMPRESSOR = importlib.util.find_spec("llmcompressor") is not None

W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "dynamic": False}
W8_CHANNEL = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "strategy": "channel",
    "dynamic": False,
}


def _groups(weights: dict[str, Any]) -> dict[str, Any]:
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head"],
    }


W8A8 = {"targets": ["Linear"], "scheme": "W8A8", "ignore": ["lm_head"]}

EXPECTED: dict[tuple[str, str, int | None], list[dict[str, Any]]] = {
    ("W4A16", "rtn", 128): [
        {"class": "QuantizationModifier", "kwargs": _groups({**W4, "group_size": 128})}
    ],
    ("W4A16", "gptq", 64): [
        {"class": "GPTQModifier", "kwargs": _groups({**W4, "group_size": 64})}
    ],
    ("W4A16", "awq", 32): [
        {"class": "AWQModifier", "kwargs": {}},
        {
            "class": "QuantizationModifier",
            "kwargs": _groups({**W4, "symmetric": False, "group_size": 32}),
        },
    ],
    ("W8A16", "rtn", None): [{"class": "QuantizationModifier", "kwargs": _groups(W8_CHANNEL)}],
    ("W8A16", "gptq", None): [{"class": "GPTQModifier", "kwargs": _groups(W8_CHANNEL)}],
    ("W8A8", "rtn", None): [{"class": "QuantizationModifier", "kwargs": W8A8}],
    ("W8A8", "gptq", None): [{"class": "GPTQModifier", "kwargs": W8A8}],
    ("W8A8", "smoothquant-gptq", None): [
        {"class": "SmoothQuantModifier", "kwargs": {"smoothing_strength": 0.8}},
        {"class": "GPTQModifier", "kwargs": W8A8},
    ],
}


@pytest.mark.parametrize(("scheme", "algorithm", "group_size"), list(EXPECTED))
def test_describe_recipe(scheme: str, algorithm: str, group_size: int | None) -> None:
    described = describe_recipe(scheme, algorithm, group_size)
    assert described == EXPECTED[(scheme, algorithm, group_size)]
    assert json.loads(json.dumps(described)) == described  # plain data
    # Every modifier that quantizes keeps the output head in 16 bits.
    assert described[-1]["kwargs"]["ignore"] == ["lm_head"]


def test_every_combination_is_described() -> None:
    combos = {(s, a) for s, algorithms in quantize_job.ALGORITHMS.items() for a in algorithms}
    assert combos == {(s, a) for s, a, _ in EXPECTED}
    for scheme, algorithm in combos:
        for size in (32, 64, 128) if scheme == "W4A16" else (None,):
            described = describe_recipe(scheme, algorithm, size)
            if size is not None:
                weights = described[-1]["kwargs"]["config_groups"]["group_0"]["weights"]
                assert weights["group_size"] == size


def test_w4a16_defaults_to_the_preset_group_of_128() -> None:
    assert describe_recipe("W4A16", "rtn", None) == describe_recipe("W4A16", "rtn", 128)


@pytest.mark.parametrize(
    ("scheme", "algorithm", "group_size", "words"),
    [
        ("W3A16", "rtn", None, "unknown --scheme 'W3A16'"),
        ("W4A16", "smoothquant-gptq", 128, "cannot produce W4A16"),
        ("W8A16", "awq", None, "cannot produce W8A16"),
        ("W8A8", "awq", None, "cannot produce W8A8"),
        ("W4A16", "magic", 128, "--algorithm 'magic'"),
        ("W8A8", "gptq", 128, "--group-size is for W4A16 only"),
        ("W8A16", "rtn", 64, "--group-size is for W4A16 only"),
        ("W4A16", "gptq", 0, "positive integer"),
    ],
)
def test_describe_recipe_rejects(
    scheme: str, algorithm: str, group_size: int | None, words: str
) -> None:
    with pytest.raises(JobError, match=re.escape(words)):
        describe_recipe(scheme, algorithm, group_size)


def test_the_script_stands_alone() -> None:
    """Run with the vLLM environment's Python: only the standard library at import time."""
    tree = ast.parse(JOB.read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.module is not None
            top_level.add(node.module.split(".")[0])
    assert top_level - {"__future__"} <= set(sys.stdlib_module_names)
    all_imports = {
        (alias.name if isinstance(node, ast.Import) else node.module or "")
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not any(name.startswith("evo_compress") for name in all_imports)


# --------------------------------------------------------------------------- the script


def _run(*args: str | Path, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": ""}  # the script must not need the project
    return subprocess.run(
        [python, str(JOB), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd="/",
        check=False,
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text("12+34=46\n\n7+8=15\n")
    return path


def _last_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert lines, proc
    return lines[-1]


def _invalid_cases(model: Path, out: Path, calib: Path) -> list[tuple[list[Any], str]]:
    common = ["--input", model, "--output", out]
    gptq = [*common, "--scheme", "W4A16", "--algorithm", "gptq"]
    return [
        ([*common, "--scheme", "W4A16"], "the following arguments are required: --algorithm"),
        ([*common, "--scheme", "W5A16", "--algorithm", "rtn"], "unknown --scheme 'W5A16'"),
        (
            [*common, "--scheme", "W4A16", "--algorithm", "smoothquant-gptq"],
            "--algorithm 'smoothquant-gptq' cannot produce W4A16",
        ),
        (
            [*common, "--scheme", "W8A8", "--algorithm", "gptq", "--group-size", "128"],
            "--group-size is for W4A16 only",
        ),
        (gptq, "--algorithm gptq needs calibration text: --calibration"),
        (
            [*common, "--scheme", "W4A16", "--algorithm", "awq"],
            "--algorithm awq needs calibration text",
        ),
        (
            [*common, "--scheme", "W8A8", "--algorithm", "smoothquant-gptq"],
            "--algorithm smoothquant-gptq needs calibration text",
        ),
        ([*gptq, "--calibration", out / "x"], "is not a file"),
        ([*gptq, "--calibration-ids", out / "x"], "--calibration-ids"),
        ([*gptq, "--calibration-ids", calib], f"--calibration-ids {calib} is not JSON"),
        (
            [*gptq, "--calibration", calib, "--calibration-ids", calib],
            "give --calibration or --calibration-ids, not both",
        ),
        (
            [*gptq, "--calibration", calib, "--samples", "0"],
            "needs --samples >= 1, got 0",
        ),
        (
            [*common, "--scheme", "W4A16", "--algorithm", "rtn", "--group-size", "x"],
            "argument --group-size: invalid int value: 'x'",
        ),
        (
            ["--input", out, "--output", out / "o", "--scheme", "W4A16", "--algorithm", "rtn"],
            "is not a model folder (no config.json)",
        ),
        (
            [*common, "--scheme", "W4A16", "--algorithm", "rtn", "--device", "tpu"],
            "--device must be auto, cpu, cuda or cuda:N, got 'tpu'",
        ),
        (
            [*common, "--scheme", "W4A16", "--algorithm", "rtn", "--max-seq-len", "0"],
            "--max-seq-len must be >= 1",
        ),
    ]


def test_invalid_arguments_exit_1_with_one_clear_line(
    tmp_path: Path, model_dir: Path, calibration: Path
) -> None:
    out = tmp_path / "out"
    for args, words in _invalid_cases(model_dir, out, calibration):
        proc = _run(*args)
        assert proc.returncode == 1, (args, proc.stderr)
        line = _last_error_line(proc)
        assert line.startswith("quantize_job: error: "), line
        assert words in line, (words, line)
        assert "Traceback" not in proc.stderr
        assert not out.exists()


def test_a_non_empty_output_is_refused(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.bin").write_text("x")
    proc = _run("--input", model_dir, "--output", out, "--scheme", "W8A16", "--algorithm", "rtn")
    assert proc.returncode == 1
    assert "exists and is not an empty folder" in _last_error_line(proc)


@pytest.mark.skipif(HAS_LLMCOMPRESSOR, reason="llm-compressor is installed here")
@pytest.mark.parametrize(
    "extra",
    [
        ["--scheme", "W4A16", "--algorithm", "gptq", "--group-size", "64"],
        ["--scheme", "W4A16", "--algorithm", "rtn"],  # needs no calibration
        ["--scheme", "W8A8", "--algorithm", "smoothquant-gptq", "--device", "cpu"],
    ],
)
def test_a_valid_call_without_llmcompressor_says_so(
    tmp_path: Path, model_dir: Path, calibration: Path, extra: list[str]
) -> None:
    out = tmp_path / "out"
    proc = _run(
        "--input", model_dir, "--output", out, *extra,
        "--calibration", calibration, "--samples", "8", "--max-seq-len", "64",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    line = _last_error_line(proc)
    assert line.startswith(
        "quantize_job: error: llm-compressor is not installed in this environment ("
    ), line
    assert sys.executable in line
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.skipif(HAS_LLMCOMPRESSOR, reason="llm-compressor is installed here")
def test_build_recipe_without_llmcompressor_raises_job_error() -> None:
    with pytest.raises(JobError, match="llm-compressor is not installed"):
        build_recipe("W4A16", "gptq", 128)
    with pytest.raises(JobError, match="unknown --scheme"):  # the arguments come first
        build_recipe("W2A16", "gptq", 128)


# --------------------------------------------------------------------------- build_recipe


class _Modifier:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


def _fake_llmcompressor(monkeypatch: pytest.MonkeyPatch, *, transforms: bool) -> None:
    """A stand-in package laid out like llm-compressor 0.14 (transforms) or like the
    releases before it, where AWQ quantized by itself; only where classes live matters."""

    def module(name: str, **classes: Any) -> None:
        mod = types.ModuleType(name)
        for cls_name, cls in classes.items():
            setattr(mod, cls_name, cls)
        monkeypatch.setitem(sys.modules, name, mod)

    made = {n: type(n, (_Modifier,), {}) for n in _MODIFIERS}
    module("llmcompressor")
    module("llmcompressor.modifiers")
    module(
        "llmcompressor.modifiers.quantization",
        QuantizationModifier=made["QuantizationModifier"],
        GPTQModifier=made["GPTQModifier"],
    )
    if transforms:
        module("llmcompressor.modifiers.gptq", GPTQModifier=made["GPTQModifier"])
        module(
            "llmcompressor.modifiers.transform",
            AWQModifier=made["AWQModifier"],
            SmoothQuantModifier=made["SmoothQuantModifier"],
        )
    else:
        monkeypatch.setitem(sys.modules, "llmcompressor.modifiers.transform", None)
        monkeypatch.setitem(sys.modules, "llmcompressor.modifiers.gptq", None)
        module("llmcompressor.modifiers.awq", AWQModifier=made["AWQModifier"])
        module(
            "llmcompressor.modifiers.smoothquant",
            SmoothQuantModifier=made["SmoothQuantModifier"],
        )


_MODIFIERS = ("QuantizationModifier", "GPTQModifier", "AWQModifier", "SmoothQuantModifier")


@pytest.mark.parametrize("transforms", [True, False], ids=["0.14 layout", "older layout"])
def test_build_recipe_follows_the_description(
    monkeypatch: pytest.MonkeyPatch, transforms: bool
) -> None:
    _fake_llmcompressor(monkeypatch, transforms=transforms)
    for scheme, algorithm, size in EXPECTED:
        described = describe_recipe(scheme, algorithm, size)
        built = build_recipe(scheme, algorithm, size)
        if algorithm == "awq" and not transforms:
            # The old AWQModifier takes the quantization arguments itself.
            (awq,) = built
            assert type(awq).__name__ == "AWQModifier"
            assert awq.kwargs == {**described[0]["kwargs"], **described[1]["kwargs"]}
            continue
        assert [type(m).__name__ for m in built] == [d["class"] for d in described]
        assert [m.kwargs for m in built] == [d["kwargs"] for d in described]
        # Each call gets its own copies: a modifier may edit its arguments.
        built[-1].kwargs["ignore"].append("x")
        assert describe_recipe(scheme, algorithm, size) == described


@pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="needs llm-compressor")
def test_build_recipe_with_the_real_llmcompressor() -> None:
    for scheme, algorithm, size in EXPECTED:
        modifiers = build_recipe(scheme, algorithm, size)
        config = modifiers[-1].resolved_config
        (group,) = config.config_groups.values()
        assert group.weights.num_bits == (4 if scheme == "W4A16" else 8)
        assert group.weights.group_size == size
        assert config.ignore == ["lm_head"]


# --------------------------------------------------------------------------- end to end


def _quantizer_python() -> str | None:
    if HAS_LLMCOMPRESSOR:
        return sys.executable
    return os.environ.get("EVO_COMPRESS_QUANTIZER_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(_quantizer_python() is None, reason="no Python with llm-compressor")
@pytest.mark.parametrize(
    ("scheme", "algorithm", "group_size"),
    [("W4A16", "gptq", 32), ("W4A16", "rtn", 64), ("W8A8", "smoothquant-gptq", None)],
)
def test_quantizes_the_reference_model(
    tmp_path: Path, scheme: str, algorithm: str, group_size: int | None
) -> None:
    from evo_compress.reference import default_cache_dir
    from evo_compress.reference.model import is_complete, reference_model_dir

    model = reference_model_dir(default_cache_dir())
    if not is_complete(model):
        pytest.skip("the reference model is not trained in this checkout")
    calib = tmp_path / "calib.txt"
    calib.write_text(
        "\n".join(f"{a}+{b}={a + b}" for a, b in zip(range(9, 90, 5), range(17), strict=True))
    )
    out = tmp_path / "out"
    size = ["--group-size", str(group_size)] if group_size else []
    python = _quantizer_python()
    assert python is not None
    proc = _run(
        "--input", model, "--output", out, "--scheme", scheme, "--algorithm", algorithm, *size,
        "--calibration", calib, "--samples", "16", "--max-seq-len", "32", "--device", "cpu",
        python=python,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "evo_quantize.json").read_text())
    assert info["scheme"] == scheme and info["algorithm"] == algorithm
    assert info["group_size"] == group_size
    assert info["samples"] == (0 if algorithm == "rtn" else 16)  # rtn needs no calibration
    assert info["llmcompressor_version"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["ignore"] == ["lm_head"]
    (group,) = config["config_groups"].values()
    assert group["weights"]["num_bits"] == (4 if scheme == "W4A16" else 8)
    assert group["weights"]["group_size"] == group_size
    assert (out / "tokenizer.json").is_file()
