"""Serving measurements on the transformers back end: latency and memory of greedy generation,
and the serving genes (attention kernel, KV cache) this back end can apply.

The objectives, as this back end defines them:

- **latency** = ``measure_latency(...)["ms_per_token_median"]``: the median, over timed
  batches, of batch wall time / new tokens per sequence (ms per output token as each of the
  ``batch_size`` concurrent sequences sees it, time to first token included).
- **memory** = ``MemoryMeter(...).result["mib"]``: on CUDA the allocator's peak while serving
  (weights, activations and KV cache); on CPU the weights' measured footprint plus the peak
  growth of the process's resident memory while serving.
"""

from __future__ import annotations

import math
import re
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from evo_compress.fitness.model.architecture import SLIDING_WINDOW_MODEL_TYPES
from evo_compress.fitness.model.quantize import model_weight_bytes

T = TypeVar("T")
MIB = 1024 * 1024

ATTENTION_BACKENDS = {
    "auto": "sdpa",
    "sdpa": "sdpa",
    "eager": "eager",
    "flash_attention_2": "flash_attention_2",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- serving genes


def attention_unsupported(backend: str, device: torch.device | str) -> str | None:
    """Why the ``serve.attention_backend`` value cannot run on ``device`` with transformers
    (None if it can); ``set_attention`` also checks what depends on the model."""
    dev = torch.device(device)
    if backend == "flashinfer":
        return "flashinfer is a vLLM / SGLang kernel; transformers has no flashinfer attention"
    if backend not in ATTENTION_BACKENDS:
        return f"unknown attention backend {backend!r}"
    if ATTENTION_BACKENDS[backend] == "flash_attention_2":
        if dev.type != "cuda":
            return f"flash_attention_2 needs a CUDA GPU (this device: {dev.type})"
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash_attention_2 needs the flash-attn package, which is not installed"
    return None


def set_attention(model: nn.Module, backend: str, device: torch.device | str) -> str | None:
    """Switch the model to the ``serve.attention_backend`` kernel (``auto`` means sdpa);
    returns the reason it cannot be used here, or None once it is set."""
    reason = attention_unsupported(backend, device)
    if reason is not None:
        return reason
    hf: Any = model
    impl = ATTENTION_BACKENDS[backend]
    if impl == "flash_attention_2" and hf.dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attention_2 needs fp16 or bf16 weights, not {hf.dtype}"
    try:
        hf.set_attn_implementation(impl)
    except (ImportError, ValueError) as exc:
        return f"transformers cannot use {impl} attention for this model: {exc}"
    if hf.config._attn_implementation != impl:
        return f"transformers did not switch this model to {impl} attention"
    return None


def kv_unsupported(
    recipe: Mapping[str, Any], device: torch.device | str, model: nn.Module | None = None
) -> str | None:
    """Why this back end cannot apply the recipe's ``kv.*`` genes (None if it can).

    ``kv.dtype: fp8`` is transformers' ``QuantizedCache`` with its fp8 backend (float8 e4m3
    storage with a per-tensor scale frozen at prefill; the states are dequantized for
    attention at every step), which runs on CPU and GPU. ``kv.sliding_window`` needs a model
    whose transformers implementation has sliding-window attention (``model`` tells).
    """
    del device  # both work wherever the model runs: the fp8 cache only casts
    fp8 = recipe.get("kv.dtype", "auto") == "fp8"
    sliding = bool(recipe.get("kv.sliding_window", False))
    if recipe.get("kv.dtype", "auto") not in ("auto", "fp8"):
        return f"unknown kv.dtype {recipe.get('kv.dtype')!r}"
    if fp8 and not hasattr(torch, "float8_e4m3fn"):
        return "this torch has no float8_e4m3fn dtype for an fp8 KV cache"
    if sliding:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in SLIDING_WINDOW_MODEL_TYPES:
            which = f"transformers' {model_type} model" if model_type else "this model"
            return (
                f"{which} has no sliding-window attention on the transformers back end "
                f"(only {', '.join(sorted(SLIDING_WINDOW_MODEL_TYPES))} models have it)"
            )
        if fp8:
            return "transformers' quantized (fp8) KV cache supports only full-attention layers"
    return None


def apply_kv(
    model: nn.Module, recipe: Mapping[str, Any], device: torch.device | str
) -> dict[str, Any]:
    """Apply the recipe's ``kv.*`` genes; returns the extra ``generate`` keyword arguments.
    Raises ValueError with the reason for what ``kv_unsupported`` rejects."""
    reason = kv_unsupported(recipe, device, model)
    if reason is not None:
        raise ValueError(reason)
    kwargs: dict[str, Any] = {}
    if recipe.get("kv.dtype", "auto") == "fp8":
        kwargs.update(cache_implementation="quantized", cache_config={"backend": "fp8"})
    if recipe.get("kv.sliding_window", False):
        model.config.sliding_window = int(recipe.get("kv.window", 4096))  # type: ignore[union-attr]
    elif getattr(model.config, "model_type", None) in SLIDING_WINDOW_MODEL_TYPES:
        model.config.sliding_window = None  # type: ignore[union-attr]
    return kwargs


# --------------------------------------------------------------------------- latency


class _FirstTokenClock:
    """A ``generate`` streamer that notes when the first new tokens come out (its first
    ``put`` is the prompt, the second the first generated token of every sequence)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            _sync(self.device)
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def _batches(prompts: Sequence[str], batch_size: int) -> list[list[str]]:
    """Batches of exactly ``batch_size`` prompts, cycling through ``prompts`` to fill the
    last (or only) one, so every batch runs ``batch_size`` concurrent sequences."""
    n_batches = math.ceil(len(prompts) / batch_size)
    cycled = [prompts[i % len(prompts)] for i in range(n_batches * batch_size)]
    return [cycled[i : i + batch_size] for i in range(0, len(cycled), batch_size)]


def _summary(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {
        "median": float(np.median(arr)),
        "p95": float(np.percentile(arr, 95)),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str = "cpu",
    generate_kwargs: Mapping[str, Any] | None = None,
    energy_meter: Any = None,
) -> dict[str, Any]:
    """Time greedy generation of exactly ``max_new_tokens`` new tokens per sequence, in
    batches of ``batch_size`` prompts (``serve.max_num_seqs`` on this back end), left-padded.

    ``warmup`` untimed runs on the first batch, then ``repeats`` passes over every batch; each
    timed batch gives one sample of: ms per output token (batch wall time / new tokens: THE
    latency objective is their median, ``ms_per_token_median``), time to first token (from
    the call to the first generated token, prefill included) and decode time per token after
    the first. ``cpu_s`` (process CPU time) and ``tokens_generated`` cover the timed runs
    only, as does ``energy_meter`` (an ``EnergyMeter``, entered around them) when given.
    """
    if max_new_tokens < 1 or batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            "need max_new_tokens >= 1, batch_size >= 1, repeats >= 1 and warmup >= 0, got "
            f"{max_new_tokens}, {batch_size}, {repeats}, {warmup}"
        )
    if not prompts:
        raise ValueError("`prompts` must not be empty")
    dev = torch.device(device)
    saved_side, set_pad = tokenizer.padding_side, tokenizer.pad_token is None
    tokenizer.padding_side = "left"
    if set_pad:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        encoded = [
            tokenizer(batch, return_tensors="pt", padding=True).to(dev)
            for batch in _batches(prompts, batch_size)
        ]
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": max_new_tokens,
            "do_sample": False,
            "num_beams": 1,
            "pad_token_id": tokenizer.pad_token_id,
            **(generate_kwargs or {}),
        }

        def run(enc: Any) -> tuple[float, float]:
            clock = _FirstTokenClock(dev)
            _sync(dev)
            start = time.perf_counter()
            out = model.generate(**enc, streamer=clock, **gen_kwargs)  # type: ignore[operator]
            _sync(dev)
            end = time.perf_counter()
            new = out.shape[1] - enc["input_ids"].shape[1]
            if new != max_new_tokens:
                raise RuntimeError(f"generate made {new} new tokens, expected {max_new_tokens}")
            first = clock.first_token_at if clock.first_token_at is not None else end
            return end - start, first - start

        for _ in range(warmup):
            run(encoded[0])
        per_token, ttft, decode, walls = [], [], [], []
        if energy_meter is not None:
            energy_meter.__enter__()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            for _ in range(repeats):
                for enc in encoded:
                    wall, first = run(enc)
                    walls.append(wall)
                    per_token.append(1000.0 * wall / max_new_tokens)
                    ttft.append(1000.0 * first)
                    if max_new_tokens > 1:
                        decode.append(1000.0 * (wall - first) / (max_new_tokens - 1))
        finally:
            cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
            if energy_meter is not None:
                energy_meter.__exit__(None, None, None)
    finally:
        tokenizer.padding_side = saved_side
        if set_pad:
            tokenizer.pad_token = None

    tokens = len(walls) * batch_size * max_new_tokens
    tpot, first_tok = _summary(per_token), _summary(ttft)
    result: dict[str, Any] = {
        "objective": "ms_per_token_median",
        "ms_per_token_median": tpot["median"],
        "ms_per_token_p95": tpot["p95"],
        "ttft_ms_median": first_tok["median"],
        "ttft_ms_p95": first_tok["p95"],
        "decode_ms_per_token_median": _summary(decode)["median"] if decode else None,
        "tokens_generated": tokens,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "samples": len(walls),
        "repeats": repeats,
        "warmup": warmup,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "spread": {
            "ms_per_token_min": tpot["min"],
            "ms_per_token_max": tpot["max"],
            "p95_over_median": tpot["p95"] / tpot["median"] if tpot["median"] > 0 else None,
        },
        "device": str(dev),
    }
    if energy_meter is not None:
        result["energy"] = energy_meter.result.to_dict()
    return result


# --------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (VmHWM) of this process."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class MemoryMeter:
    """Context manager for the ``memory`` objective of the serving run inside it.

    CUDA: ``torch.cuda.max_memory_allocated`` during the window (reset on entry): weights,
    activations and KV cache, as the allocator saw them. CPU: the weights' footprint as
    ``model_weight_bytes`` measures it (at exit, so lazily repacked weights count as served)
    plus the peak growth of resident memory (RSS) during the window over its value at entry.
    The peak is VmHWM after resetting it through ``/proc/self/clear_refs``; where that is not
    allowed it falls back to ``ru_maxrss``, a process-lifetime peak that is only meaningful in
    a fresh worker process per evaluation (``result["peak_source"]`` says which).
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)
        self._result: dict[str, Any] | None = None
        self._rss0 = 0
        self._hwm_reset = False

    @property
    def result(self) -> dict[str, Any]:
        if self._result is None:
            raise RuntimeError("the memory meter has no result before its window has closed")
        return self._result

    def __enter__(self) -> MemoryMeter:
        self._result = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._hwm_reset = _reset_peak_rss()
            self._rss0 = (_proc_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        weights = model_weight_bytes(self.model)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self._result = {
                "mib": peak / MIB,
                "weights_mib": weights / MIB,
                "allocator_peak_mib": peak / MIB,
                "how": "CUDA allocator peak (torch.cuda.max_memory_allocated) during serving",
                "peak_source": "torch.cuda.max_memory_allocated",
            }
            return
        hwm = _proc_status_kib("VmHWM") if self._hwm_reset else None
        if hwm is not None:
            peak_rss, source = hwm * 1024, "VmHWM (reset at window start)"
        else:
            # ru_maxrss is KiB on Linux: the process's lifetime peak.
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            source = "ru_maxrss (process-lifetime peak: use a fresh process per evaluation)"
        growth = max(0, peak_rss - self._rss0)
        self._result = {
            "mib": (weights + growth) / MIB,
            "weights_mib": weights / MIB,
            "peak_rss_growth_mib": growth / MIB,
            "rss_start_mib": self._rss0 / MIB,
            "how": "measured weight footprint + peak resident-memory growth during serving",
            "peak_source": source,
        }


class ModelPeakMeter:
    """The model's part of a whole evaluation's peak memory (loading, compression, accuracy
    and serving): the peak over what was in use when the meter was made, before loading.

    CUDA: ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` at the start. CPU: the
    resident high-water mark (VmHWM, reset at the start; else ``ru_maxrss``) over the
    resident memory at the start. ``MemoryMeter`` resets the same counters when the serving
    window opens, so ``checkpoint`` is called before it and ``add_serving`` with its result.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._peak = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._source = "torch.cuda.max_memory_allocated - memory_allocated before loading"
        else:
            self._hwm_reset = _reset_peak_rss()
            self._base = (_proc_status_kib("VmRSS") or 0) * 1024
            self._source = (
                "peak resident memory (VmHWM) - resident memory before loading"
                if self._hwm_reset
                else "ru_maxrss - resident memory before loading"
            )

    def checkpoint(self) -> None:
        """Fold the peak so far in (before anything resets the counters)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._hwm_reset and (hwm := _proc_status_kib("VmHWM")) is not None:
            peak = hwm * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._peak = max(self._peak, peak)

    def add_serving(self, memory: Mapping[str, Any]) -> None:
        """Fold in the serving window's peak, from ``MemoryMeter``'s result."""
        if self.device.type == "cuda":
            peak = float(memory["allocator_peak_mib"]) * MIB
        else:
            peak = (float(memory["rss_start_mib"]) + float(memory["peak_rss_growth_mib"])) * MIB
        self._peak = max(self._peak, int(peak))

    def result(self) -> dict[str, Any]:
        return {
            "measured_peak_mib": max(0, self._peak - self._base) / MIB,
            "before_load_mib": self._base / MIB,
            "how": self._source,
        }


def measure_memory(
    model: nn.Module, workload: Callable[[], T], device: torch.device | str = "cpu"
) -> tuple[dict[str, Any], T]:
    """Run ``workload`` (e.g. a ``measure_latency`` call) under a ``MemoryMeter``; returns the
    memory result (``["mib"]`` is the objective) and what the workload returned."""
    meter = MemoryMeter(model, device)
    with meter:
        value = workload()
    return meter.result, value


__all__ = [
    "ATTENTION_BACKENDS",
    "MemoryMeter",
    "ModelPeakMeter",
    "apply_kv",
    "attention_unsupported",
    "kv_unsupported",
    "measure_latency",
    "measure_memory",
    "set_attention",
]
