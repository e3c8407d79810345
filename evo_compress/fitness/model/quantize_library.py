"""int4 weights from llm-compressor on the transformers back end: the model is saved, the vLLM
back end's quantization job (``quantize_job.py``: W4A16, GPTQ or AWQ) runs on it with the
quantization environment's Python, and the int4 values, scales and zero points of the
compressed-tensors checkpoint it writes are stored back into the model as torchao int4
tensors. So ``gptq`` is one algorithm on both back ends, and the transformers back end still
measures int4 storage, not weights unpacked to full precision.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evo_compress.exceptions import ConfigError, EvaluationError
from evo_compress.fitness.energy import children_cpu_seconds
from evo_compress.fitness.model.environments import QUANT_ENV_VAR, QUANTIZE_JOB, default_python

INT4: torch.dtype = torch.int4  # type: ignore[attr-defined]  # missing from torch's stubs
LOG_TAIL = 5  # lines of the job's log quoted in a failure


class LibraryQuantizationError(EvaluationError):
    """The quantization job failed, or wrote a checkpoint this back end cannot store."""


def library_unsupported(method: str, device: torch.device) -> str | None:
    """Why llm-compressor cannot quantize ``method`` for this back end here (None if it can):
    the quantization environment is missing. Its AWQ runs on the CPU too, once the job leaves
    out the memory pinning that needs an accelerator (``quantize_job.py``)."""
    try:
        python = default_python()
    except ConfigError as exc:
        return f"{method} runs llm-compressor in the quantization environment: {exc}"
    if python is None:
        return (
            f"{method} on the transformers back end runs llm-compressor, and its quantization "
            f"environment is not installed: run `make vllm-env`, or set `{QUANT_ENV_VAR}` to "
            "an environment it made"
        )
    return None


def unpack_int4(packed: torch.Tensor, shape: tuple[int, int], packed_dim: int = 1) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` undone for 4 bits: along ``packed_dim``,
    element i is nibble i % 8 (lowest bits first) of int32 word i // 8, stored as value + 8.
    Returns int8 values in [-8, 7] of ``shape``."""
    if packed.dtype != torch.int32:
        raise LibraryQuantizationError(f"packed int4 weights must be int32, got {packed.dtype}")
    words = packed.t() if packed_dim == 0 else packed  # packed along dim 0: work on rows
    length = shape[packed_dim]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # [rows, words, 8]
    values = nibbles.reshape(words.shape[0], -1)[:, :length].to(torch.int8) - 8
    values = values.t() if packed_dim == 0 else values
    if tuple(values.shape) != tuple(shape):
        raise LibraryQuantizationError(
            f"packed int4 weights of shape {tuple(packed.shape)} do not unpack to {shape}"
        )
    return values.contiguous()


def _int4_tensor(
    qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int
) -> torch.Tensor:
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    return IntxUnpackedToInt8Tensor(
        qdata=qdata,
        scale=scale,
        zero_point=zero_point,
        target_dtype=INT4,
        block_size=(1, group_size),
        dtype=scale.dtype,
        activation_quantization=None,
    )


@contextmanager
def _folder(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="evo-compress-llmcompressor-") as tmp:
        yield Path(tmp)


def _run_job(command: list[str], log: Path, algorithm: str) -> tuple[float, float]:
    """Run the job, its output in ``log``; (wall seconds, CPU seconds of the job)."""
    started, cpu_before = time.perf_counter(), children_cpu_seconds()
    with log.open("w") as out:
        try:
            proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
        except OSError as exc:
            raise LibraryQuantizationError(
                f"cannot run the quantization environment's Python {command[0]!r}: {exc.strerror}"
            ) from None
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-LOG_TAIL:]
        raise LibraryQuantizationError(
            f"llm-compressor's {algorithm} (quantize_job.py) failed with exit code "
            f"{proc.returncode}: " + " | ".join(tail)
        )
    return time.perf_counter() - started, children_cpu_seconds() - cpu_before


def _check_config(folder: Path, group_size: int) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    groups = list((config.get("config_groups") or {}).values())
    weights = groups[0].get("weights") if len(groups) == 1 else None
    if (
        config.get("format") != "pack-quantized"
        or not isinstance(weights, dict)
        or weights.get("num_bits") != 4
        or weights.get("strategy") != "group"
        or weights.get("group_size") != group_size
    ):
        raise LibraryQuantizationError(
            "the quantization job wrote no pack-quantized int4 checkpoint with group size "
            f"{group_size}: {json.dumps(config.get('config_groups'))[:300]}"
        )
    return weights


def read_int4(
    folder: Path, names: list[str], group_size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The int4 values [out, in] (int8), scales [out, in / group] and zero points (int8,
    None for symmetric weights) of each layer in ``names``, read from a compressed-tensors
    checkpoint as they are stored."""
    from safetensors import safe_open

    weights = _check_config(folder, group_size)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    found: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    for name in names:
        if f"{name}.weight_packed" not in tensors:
            raise LibraryQuantizationError(f"the quantized checkpoint has no int4 `{name}`")
        if f"{name}.weight_g_idx" in tensors:  # act-order groups are not contiguous
            raise LibraryQuantizationError(f"`{name}` was quantized with reordered groups")
        shape = tuple(int(v) for v in tensors[f"{name}.weight_shape"].tolist())
        assert len(shape) == 2
        qdata = unpack_int4(tensors[f"{name}.weight_packed"], (shape[0], shape[1]))
        scale = tensors[f"{name}.weight_scale"]
        zero_point = None
        if not weights.get("symmetric", True):
            zero_point = unpack_int4(
                tensors[f"{name}.weight_zero_point"],
                (scale.shape[0], scale.shape[1]),
                packed_dim=0,
            )
        found[name] = (qdata, scale, zero_point)
    return found


def read_unquantized(folder: Path, targets: list[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed-tensors checkpoint that is not part of a quantized layer
    in ``targets``: the norms, embeddings and biases, which AWQ's smoothing rescales."""
    from safetensors import safe_open

    prefixes = tuple(f"{name}.weight_" for name in targets)
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                if not key.startswith(prefixes):
                    found[key] = f.get_tensor(key)
    return found


def _copy_changed(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Copy into ``model`` each tensor whose values the job changed (AWQ folds its scales
    into the layer before each smoothed one: a norm's weight); the names of those copied."""
    state = model.state_dict()
    changed = []
    with torch.no_grad():
        for name, tensor in tensors.items():
            mine = state.get(name)
            if mine is None or mine.shape != tensor.shape:
                continue
            value = tensor.to(mine.device, mine.dtype)
            if not torch.equal(mine, value):
                mine.copy_(value)
                changed.append(name)
    return changed


def quantize_with_library(
    model: nn.Module,
    *,
    algorithm: str,
    targets: dict[str, nn.Linear],
    group_size: int,
    calibration: torch.Tensor,
    device: torch.device,
    workdir: Path | None,
) -> dict[str, Any]:
    """Quantize ``targets`` of ``model`` with llm-compressor's ``algorithm`` (W4A16, group
    size ``group_size``, calibrated on exactly the token ids ``calibration`` [N, T]), in
    place: each target's weight becomes the torchao int4 tensor of the job's values, scales
    and zero points. Returns what to record. Raises ``LibraryQuantizationError``."""
    reason = library_unsupported(algorithm, device)
    if reason is not None:
        raise LibraryQuantizationError(reason)
    python = default_python()
    assert python is not None
    with _folder(workdir) as work:
        source, output = work / "llmcompressor-source", work / "llmcompressor-output"
        model.save_pretrained(source, safe_serialization=True)  # type: ignore[operator]
        ids = work / "llmcompressor-calibration.json"
        ids.write_text(json.dumps(calibration.tolist()))
        command = [
            python,
            str(QUANTIZE_JOB),
            "--input", str(source),
            "--output", str(output),
            "--scheme", "W4A16",
            "--algorithm", algorithm,
            "--group-size", str(group_size),
            "--calibration-ids", str(ids),
            "--samples", str(calibration.shape[0]),
            "--device", str(device) if device.type == "cuda" else "cpu",
        ]  # fmt: skip
        log = work / "llmcompressor.log"
        wall, cpu = _run_job(command, log, algorithm)
        marker = json.loads((output / "evo_quantize.json").read_text())
        found = read_int4(output, sorted(targets), group_size)
        rescaled = _copy_changed(model, read_unquantized(output, sorted(targets)))
        errors: list[float] = []
        for name, linear in targets.items():
            qdata, scale, zero_point = found[name]
            dtype, where = linear.weight.dtype, linear.weight.device
            zero = torch.zeros(scale.shape, dtype=torch.int8) if zero_point is None else zero_point
            stored = _int4_tensor(
                qdata.to(where), scale.to(where, dtype), zero.to(where), group_size
            )
            w = linear.weight.detach().float()
            errors.append(float((stored.dequantize().float() - w).norm() / w.norm().clamp(1e-12)))
            linear.weight = nn.Parameter(stored, requires_grad=False)
    version = marker.get("llmcompressor_version")
    return {
        "algorithm": f"{algorithm} (llm-compressor {version})",
        "library": f"llm-compressor {version} (quantization environment)",
        "llmcompressor": {
            "version": version,
            "recipe": marker.get("recipe"),
            "job_seconds": marker.get("seconds"),
            "wall_seconds": round(wall, 3),
            "cpu_seconds": round(cpu, 3),
            "python": python,
            "log": str(log),
            "calibration": "token ids [N, T], as given",
            "symmetric": all(z is None for _q, _s, z in found.values()),
            "rescaled_tensors": rescaled,
        },
        "weight_relative_error_mean": sum(errors) / max(len(errors), 1),
        # The job ran in a child process: a CPU-time energy estimate of this process misses
        # these seconds, so they are handed to the one who measures (``compress.py``).
        "subprocess_cpu_seconds": round(cpu, 3),
    }


__all__ = [
    "LibraryQuantizationError",
    "library_unsupported",
    "quantize_with_library",
    "read_int4",
    "read_unquantized",
    "unpack_int4",
]
