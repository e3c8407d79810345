"""Weight quantization on the transformers back end: apply a recipe's ``quant.*`` genes to a
model, and measure the bytes its weights really occupy afterwards.

Each method's kernel, probe and storage config are named by its registry entry
(``TransformersSupport``, ``"module:attr"``) and looked up here when used; this module holds
the built-in ones. torchao quantizes int8 (weight-only, w8a8), int4 RTN and fp8, and stores
every int4 result. GPTQ's int4 values come from llm-compressor in the quantization
environment (``quantize_library``: the same job as the vLLM back end's), and so do AWQ's;
without that environment AWQ is this module's own, named so in its record.
bitsandbytes does nf4 and LLM.int8. Only the decoder's linear layers are quantized: the
embeddings and the output head (``lm_head``) stay in full precision, as in AWQ, GPTQ and
bitsandbytes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evo_compress.exceptions import EvaluationError
from evo_compress.fitness.model.quantize_library import INT4
from evo_compress.methods import METHODS, CompressionMethod

DEFAULT_GROUP_SIZE = 128  # the gene's default, used when a recipe leaves it out

AWQ_GRID = 20  # alphas 0, 0.05, ..., 0.95, as in llm-awq's auto_scale
AWQ_MAX_ROWS = 512  # calibration rows (tokens) kept per layer group for the alpha search
CALIBRATION_BATCH = 8  # calibration sequences per forward pass

_INT4_STORAGE = (
    "int4 values stored unpacked, one per int8 (torchao IntxUnpackedToInt8Tensor), "
    "plus one scale (model dtype) and one int8 zero point per group"
)


class QuantizationUnsupportedError(EvaluationError):
    """A quantization method (or its group size) cannot run on this device or model."""


@dataclass(frozen=True)
class QuantResult:
    """A quantized model with what was done and the bytes its weights really occupy.

    ``model`` may be a new object (bitsandbytes reloads the model); the model passed in may
    have been modified in place (torchao quantizes in place, AWQ folds scales) and must not be
    reused as the unquantized model.
    """

    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    weight_bytes: int = 0


# --------------------------------------------------------------------------- measurement


def _is_wrapper_subclass(t: torch.Tensor) -> bool:
    """A tensor subclass that stores its data in inner tensors (torchao), not in itself."""
    return hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter)


def _inner_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every plain tensor that holds the data of ``obj``: torchao subclasses are flattened to
    their inner tensors, bitsandbytes parameters yield their packed data and the tensors of
    their quantization state (absmax, code, nested state)."""
    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        if _is_wrapper_subclass(obj):
            names, _ = obj.__tensor_flatten__()  # type: ignore[attr-defined]
            for name in names:
                inner = getattr(obj, name, None)
                if inner is not None:
                    yield from _inner_tensors(inner, depth + 1)
            return
        yield obj
        # bitsandbytes keeps quantization data beside the tensor: Params4bit.quant_state,
        # Int8Params.SCB. `module` points back to the layer and is not data.
        for name, value in vars(obj).items():
            if name == "module":
                continue
            if isinstance(value, torch.Tensor) or type(value).__name__ == "QuantState":
                yield from _inner_tensors(value, depth + 1)
    elif type(obj).__name__ == "QuantState":
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor) or type(value).__name__ == "QuantState":
                yield from _inner_tensors(value, depth + 1)


def tensor_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    """Bytes the given tensors' data occupies, each underlying tensor counted once."""
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    for top in tensors:
        for t in _inner_tensors(top):
            if t.device.type == "meta":
                continue
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy, measured from the tensors that hold
    them (quantized data, scales, zero points, quantization state), shared tensors once."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


# --------------------------------------------------------------------------- support checks


def _method(name: str) -> CompressionMethod | None:
    """The registered quantization method this back end runs, or None."""
    entry = METHODS.find(name, "quantization")
    return entry if entry is not None and entry.transformers is not None else None


@functools.cache
def resolve(reference: str) -> Any:
    """The object a registry entry names as ``"module:attr"`` (``attr`` may be dotted),
    imported now; one line when it cannot be."""
    module_name, _, attr = reference.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise QuantizationUnsupportedError(
            f"the kernel `{reference}` cannot be loaded ({type(exc).__name__}: {exc})"
        ) from None
    return obj


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers that get quantized: every ``nn.Linear`` but the output head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }


@functools.cache
def _probe(method: str, device_type: str) -> str | None:
    """Quantize one small linear layer with ``method``'s probe and run it: the honest test
    of whether the installed libraries can do it here. None when it works."""
    entry = _method(method)
    if entry is None or entry.transformers is None or entry.transformers.probe is None:
        return None
    device = torch.device(device_type)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(0)
        layer = nn.Linear(128, 64, bias=False).to(device, dtype)
        x = torch.randn(2, 128).to(device, dtype)
    try:
        probe = resolve(entry.transformers.probe)
        with torch.no_grad():
            y, ref = probe(layer, x)
    except QuantizationUnsupportedError as exc:
        return f"{method}: {exc}"
    except ImportError as exc:
        return f"{method} needs a library that is not installed here ({exc})"
    except Exception as exc:  # the library is there but cannot run on this device
        return f"{method} does not run on this device ({device}): {type(exc).__name__}: {exc}"
    if not torch.isfinite(y).all():
        return f"{method} produced non-finite outputs on this device ({device})"
    if ref is not None and not torch.allclose(y, ref, rtol=0.1, atol=0.1):
        return f"{method} gave wrong results on this device ({device})"
    return None


def quantization_unsupported(
    method: str,
    device: torch.device | str,
    *,
    group_size: int | None = None,
    model: nn.Module | None = None,
) -> str | None:
    """Why ``method`` cannot run on ``device`` (None if it can).

    With ``group_size`` and ``model``, also checks that every quantized layer's input width
    is a multiple of the group size: torchao's int4 tensors require it, and bitsandbytes'
    CPU kernel dequantizes wrongly otherwise (checked on bitsandbytes 0.50).
    """
    dev = torch.device(device)
    entry = _method(method)
    if entry is None:
        known = ", ".join(METHODS.names("quantization", backend="transformers"))
        return f"unknown quantization method {method!r} (known: {known})"
    assert entry.transformers is not None
    if entry.transformers.kernel is None:  # nothing to apply
        return None
    minimum = entry.transformers.min_compute_capability
    if minimum is not None:
        capability = (
            torch.cuda.get_device_capability(dev)
            if dev.type == "cuda" and torch.cuda.is_available()
            else None
        )
        if capability is None or capability < minimum:
            where = dev.type if capability is None else f"{dev}, sm{capability[0]}{capability[1]}"
            return (
                f"{method} needs a CUDA GPU with compute capability >= "
                f"{minimum[0]}.{minimum[1]} (this device: {where})"
            )
    reason = _probe(method, dev.type)
    if reason is None and entry.transformers.requires is not None:
        try:  # a plugin's reference that does not load is a reason, not a crash
            reason = resolve(entry.transformers.requires)(method, dev)
        except QuantizationUnsupportedError as exc:
            reason = f"{method}: {exc}"
    if reason is not None:
        return reason
    if entry.grouped and group_size is not None and model is not None:
        widths = {lin.in_features for lin in target_linears(model).values()}
        bad = sorted(w for w in widths if w % group_size)
        if bad:
            return (
                f"{method} with group size {group_size} needs every quantized layer's input "
                f"width to be a multiple of it; this model has widths {bad}"
            )
    return None


# --------------------------------------------------------------------------- torchao paths


def _int8_weight_only_config(_group_size: int) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int8_w8a8_config(_group_size: int) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _fp8_config(_group_size: int) -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

    return Float8DynamicActivationFloat8WeightConfig()


def _int4_unpacked_config(group_size: int) -> Any:
    """int4 values unpacked one per int8, a scale and zero point per group: every device."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=INT4, granularity=PerGroup(group_size))


def _torchao_probe(
    config: Any, layer: nn.Linear, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    from torchao.quantization import quantize_

    quantize_(layer, config)
    return layer(x), x @ layer.weight.dequantize().t()


def _int4_probe(layer: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _torchao_probe(_int4_unpacked_config(64), layer, x)


@functools.cache
def _cuda_int4_works(group_size: int, dtype: torch.dtype) -> bool:
    """torchao's packed int4 (tinygemm) path runs on this GPU for this dtype."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        layer = nn.Linear(256, 64, bias=False, device="cuda", dtype=dtype)
        quantize_(
            layer,
            Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d"),
        )
        y = layer(torch.randn(2, 256, device="cuda", dtype=dtype))
        return bool(torch.isfinite(y).all()) and _is_wrapper_subclass(layer.weight)
    except Exception:
        return False


def _int4_config(group_size: int, device: torch.device, dtype: torch.dtype) -> tuple[Any, str]:
    """The int4 weight-only config used for storage, with a description of its format."""
    if device.type == "cuda" and dtype == torch.bfloat16 and _cuda_int4_works(group_size, dtype):
        from torchao.quantization import Int4WeightOnlyConfig

        config = Int4WeightOnlyConfig(
            group_size=group_size, int4_packing_format="tile_packed_to_4d"
        )
        return config, "int4 packed two per byte (torchao Int4TilePackedTo4dTensor, tinygemm)"
    return _int4_unpacked_config(group_size), _INT4_STORAGE


def _int4_storage(group_size: int, device: torch.device, dtype: torch.dtype) -> Any:
    """The int4 storage of RTN and AWQ: packed for tinygemm where it runs, else unpacked."""
    return _int4_config(group_size, device, dtype)[0]


def _awq_storage(group_size: int, device: torch.device, dtype: torch.dtype) -> Any:
    """AWQ from llm-compressor (the quantization environment) is stored as GPTQ's is; the
    hand-written AWQ as RTN is."""
    from evo_compress.fitness.model.quantize_library import library_unsupported

    if library_unsupported("awq", device) is None:
        return _int4_unpacked_config(group_size)
    return _int4_storage(group_size, device, dtype)


def _int4_unpacked_storage(group_size: int, _device: torch.device, _dtype: torch.dtype) -> Any:
    """llm-compressor's int4 values (GPTQ, and AWQ where it runs) go into the unpacked int4
    tensor on every device."""
    return _int4_unpacked_config(group_size)


def torchao_storage_config(
    method: str, group_size: int, device: torch.device | str, dtype: torch.dtype
) -> Any | None:
    """The torchao config whose tensors ``method`` leaves in the model (what a saved
    checkpoint declares as its ``TorchAoConfig``), from the method's registry entry; None for
    a method torchao does not store."""
    entry = _method(method)
    if entry is None or entry.transformers is None or entry.transformers.storage is None:
        return None
    return resolve(entry.transformers.storage)(group_size, torch.device(device), dtype)


def _quantize_torchao(model: nn.Module, config: Any, names: set[str]) -> None:
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=lambda _module, fqn: fqn in names)
    # torchao skips a layer it cannot quantize (e.g. int4 with an incompatible shape) without
    # an error; a layer left in float must never be reported as quantized.
    left = [n for n, m in target_linears(model).items() if n in names and not _quantized(m)]
    if left:
        raise QuantizationUnsupportedError(
            f"torchao left {len(left)} layer(s) unquantized, e.g. `{left[0]}`"
        )


def _quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and (
        _is_wrapper_subclass(weight) or weight.dtype in (torch.uint8, torch.int8)
    )


# --------------------------------------------------------------------------- calibration


class _StopForward(Exception):
    pass


def _decoder_layers(model: nn.Module, method: str) -> nn.ModuleList:
    from evo_compress.fitness.model.prune import decoder_layers

    try:
        return decoder_layers(model)
    except ValueError as exc:
        raise QuantizationUnsupportedError(f"{method}: {exc}") from None


@torch.no_grad()
def _first_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, calibration: torch.Tensor, device: torch.device
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """The hidden states and keyword arguments (position embeddings, mask) the first decoder
    layer receives for each calibration batch; the rest of the model is not run."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calibration.shape[0], CALIBRATION_BATCH):
            batch = calibration[start : start + CALIBRATION_BATCH].to(device)
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _check_calibration(calibration: torch.Tensor | None, method: str) -> torch.Tensor:
    if calibration is None:
        raise ValueError(f"{method} needs calibration input_ids (a LongTensor [N, T]), got None")
    if calibration.dim() != 2 or calibration.dtype != torch.long or calibration.numel() == 0:
        raise ValueError(
            f"{method} calibration must be a non-empty LongTensor [N, T], got "
            f"{calibration.dtype} of shape {tuple(calibration.shape)}"
        )
    return calibration


# --------------------------------------------------------------------------- AWQ


def _int4_fake_quant(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """What the storage path turns ``weight`` into: quantize with torchao's int4 tensor and
    dequantize, so the alpha search sees exactly the error of the stored weights."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    q = IntxUnpackedToInt8Tensor.from_hp(weight, (1, group_size), INT4)
    return q.dequantize()


@dataclass
class _GroupStats:
    """Input activations of one group of linear layers that share an input."""

    abs_sum: torch.Tensor | None = None
    count: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)
    kept: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        if self.kept < AWQ_MAX_ROWS:
            take = x[: AWQ_MAX_ROWS - self.kept]
            self.rows.append(take)
            self.kept += take.shape[0]


def _awq_groups(layer: nn.Module) -> list[dict[str, Any]]:
    """AWQ's scaling groups of one Llama-style decoder layer: (the linears that share an
    input, where 1/s folds in). The fold target is a norm weight or a previous linear."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    need = {
        "input_layernorm": layer,
        "post_attention_layernorm": layer,
        "q_proj": attn,
        "k_proj": attn,
        "v_proj": attn,
        "o_proj": attn,
        "gate_proj": mlp,
        "up_proj": mlp,
        "down_proj": mlp,
    }
    if any(parent is None or not hasattr(parent, name) for name, parent in need.items()):
        raise QuantizationUnsupportedError(
            "awq needs Llama-style decoder layers (input_layernorm, self_attn.q/k/v/o_proj, "
            "post_attention_layernorm, mlp.gate/up/down_proj)"
        )
    assert attn is not None and mlp is not None
    # v -> o folds only when v's outputs map one-to-one onto o's inputs (no grouped-query
    # sharing), as in AWQ; otherwise o_proj gets plain RTN.
    v_to_o = attn.v_proj.weight.shape == attn.o_proj.weight.shape
    return [
        {
            "name": "qkv",
            "linears": [attn.q_proj, attn.k_proj, attn.v_proj],
            "prev": layer.input_layernorm,
        },
        {"name": "o", "linears": [attn.o_proj], "prev": attn.v_proj if v_to_o else None},
        {
            "name": "gate_up",
            "linears": [mlp.gate_proj, mlp.up_proj],
            "prev": layer.post_attention_layernorm,
        },
        {"name": "down", "linears": [mlp.down_proj], "prev": mlp.up_proj},
    ]


@torch.no_grad()
def _awq_search(
    linears: list[nn.Linear], stats: _GroupStats, group_size: int
) -> tuple[float, torch.Tensor, float, float]:
    """The alpha minimising the group's output error after int4 quantization, its scales,
    and the error at that alpha and at alpha = 0 (plain RTN)."""
    assert stats.abs_sum is not None
    x = torch.cat(stats.rows)
    x_mean = stats.abs_sum / stats.count
    weights = [lin.weight.detach().float() for lin in linears]
    refs = [x @ w.t() for w in weights]
    best: tuple[float, torch.Tensor, float] | None = None
    rtn_err = math.inf
    for i in range(AWQ_GRID):
        alpha = i / AWQ_GRID
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, refs, strict=True):
            wq = _int4_fake_quant((w * s).to(linears[0].weight.dtype), group_size).float()
            err += float(((x / s) @ wq.t() - ref).pow(2).mean())
        if i == 0:
            rtn_err = err
        if best is None or err < best[2]:
            best = (alpha, s, err)
    assert best is not None
    return best[0], best[1], best[2], rtn_err


@torch.no_grad()
def _awq_apply_scales(group: dict[str, Any], s: torch.Tensor) -> None:
    prev = group["prev"]
    for lin in group["linears"]:
        lin.weight.mul_(s.to(lin.weight.dtype).view(1, -1))
    if isinstance(prev, nn.Linear):  # 1/s on the previous linear's output rows
        prev.weight.div_(s.to(prev.weight.dtype).view(-1, 1))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # a norm: y = weight * normalized(x)
        prev.weight.div_(s.to(prev.weight.dtype))


@torch.no_grad()
def _awq(
    model: nn.Module,
    calibration: torch.Tensor,
    group_size: int,
    device: torch.device,
) -> dict[str, Any]:
    """AWQ's activation-aware scaling, layer by layer, in place; quantization comes after.

    Inputs of each layer come from the full-precision model (AWQ's own order): the scaling
    is exact in full precision, so later layers' inputs do not depend on it.
    """
    layers = _decoder_layers(model, "awq")
    inputs = _first_layer_inputs(model, layers, calibration, device)
    alphas: dict[str, float] = {}
    gains: dict[str, float] = {}
    for index, layer in enumerate(layers):
        groups = _awq_groups(layer)
        stats = {g["name"]: _GroupStats() for g in groups}
        handles = []
        for g in groups:
            hook_on = g["linears"][0]

            def hook(
                _m: nn.Module, args: tuple[Any, ...], group: _GroupStats = stats[g["name"]]
            ) -> None:
                group.add(args[0])

            handles.append(hook_on.register_forward_pre_hook(hook))
        try:
            outputs = [_run_layer(layer, h, kw) for h, kw in inputs]
        finally:
            for handle in handles:
                handle.remove()
        for g in groups:
            key = f"layers.{index}.{g['name']}"
            if g["prev"] is None:
                alphas[key] = 0.0  # no foldable predecessor: plain RTN
                continue
            alpha, s, err, rtn_err = _awq_search(g["linears"], stats[g["name"]], group_size)
            alphas[key] = alpha
            gains[key] = err / rtn_err if rtn_err > 0 else 1.0
            if alpha > 0:
                _awq_apply_scales(g, s)
        # The folds must leave the full-precision layer unchanged: a norm that is not
        # `weight * normalized(x)` (e.g. Gemma's 1 + weight) would not.
        hidden, kw = inputs[0]
        after = _run_layer(layer, hidden, kw)
        tol = 1e-4 if after.dtype == torch.float32 else 3e-2
        if (after - outputs[0]).float().norm() > tol * outputs[0].float().norm():
            raise QuantizationUnsupportedError(
                f"awq scale folding changed the output of layer {index} of "
                f"{type(model).__name__}: its norms are not foldable"
            )
        inputs = [(out, kw) for out, (_h, kw) in zip(outputs, inputs, strict=True)]
    return {
        "alpha_grid": [i / AWQ_GRID for i in range(AWQ_GRID)],
        "alphas": alphas,
        "error_vs_rtn": {k: round(v, 4) for k, v in gains.items()},
        "calibration_rows_per_group": AWQ_MAX_ROWS,
    }


# --------------------------------------------------------------------------- bitsandbytes


def _nf4_probe(layer: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, None]:
    import bitsandbytes as bnb

    packed, state = bnb.functional.quantize_4bit(layer.weight.data, blocksize=64, quant_type="nf4")
    return bnb.matmul_4bit(x, packed.t(), quant_state=state), None


def _bnb_reload(model: Any, config: Any, device: torch.device, workdir: Path, what: str) -> Any:
    """Save ``model`` and load it again with the bitsandbytes ``config``: transformers
    replaces the linear layers and quantizes them while loading, and the model it gives
    back saves and reloads with its ``BitsAndBytesConfig``."""
    path = Path(workdir) / f"{what}-source"
    model.save_pretrained(path)
    device_map = "cpu" if device.type == "cpu" else {"": device.index or 0}
    return type(model).from_pretrained(
        path,
        quantization_config=config,
        device_map=device_map,
        dtype=model.dtype,
        attn_implementation=model.config._attn_implementation,
    )


def _skipped_linears(model: nn.Module, targets: Mapping[str, nn.Linear]) -> list[str] | None:
    """The linear layers bitsandbytes must leave in full precision (the output head)."""
    skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets]
    return skip or None


def _nf4(
    model: Any, group_size: int, device: torch.device, workdir: Path | None
) -> tuple[nn.Module, dict[str, Any]]:
    """Save the model and reload it with a 4-bit NF4 ``BitsAndBytesConfig``; bitsandbytes'
    block size (its group size) is 64 there, so for another group size each layer is then
    re-quantized from the saved full-precision weights with that block size."""
    if workdir is None:
        raise ValueError("nf4 needs a `workdir` to save the model to and reload it from")
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    compute_dtype = torch.float32 if device.type == "cpu" else model.dtype
    targets = target_linears(model)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=False,
        llm_int8_skip_modules=_skipped_linears(model, targets),
    )
    loaded = _bnb_reload(model, config, device, workdir, "nf4")
    modules = dict(loaded.named_modules())
    layers: dict[str, Any] = {n: m for n, m in modules.items() if isinstance(m, bnb.nn.Linear4bit)}
    if set(layers) != set(targets):
        raise QuantizationUnsupportedError(
            f"bitsandbytes quantized {len(layers)} layers, expected {len(targets)}"
        )
    if group_size != 64:
        for name, layer in layers.items():
            weight = targets[name].weight.detach().to(device).contiguous()
            param = bnb.nn.Params4bit(
                weight.clone(),
                requires_grad=False,
                blocksize=group_size,
                compress_statistics=False,
                quant_type="nf4",
                quant_storage=torch.uint8,
                module=layer,
            )
            layer.weight = param._quantize(device)
    blocksizes = {layer.weight.quant_state.blocksize for layer in layers.values()}
    if blocksizes != {group_size}:
        raise QuantizationUnsupportedError(f"bitsandbytes used block sizes {sorted(blocksizes)}")
    return loaded, {
        "library": f"bitsandbytes {bnb.__version__}",
        "algorithm": f"nf4 (bitsandbytes {bnb.__version__})",
        "config": {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
            "bnb_4bit_use_double_quant": False,
            "blocksize": group_size,
            "blocksize_set_by": "BitsAndBytesConfig (64)"
            if group_size == 64
            else "re-quantized per layer with Params4bit(blocksize=...)",
        },
        "storage": "nf4 packed two per uint8 byte, one fp32 absmax per block"
        + (
            " (bitsandbytes repacks to bf16 absmax at the first forward on AVX512-BF16 CPUs)"
            if device.type == "cpu"
            else ""
        ),
    }


LLM_INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (Dettmers et al., 2022; the default)


def _int8_bnb_probe(layer: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import bitsandbytes as bnb

    weight = layer.weight.detach().clone()
    int8 = bnb.nn.Linear8bitLt(
        layer.in_features,
        layer.out_features,
        bias=False,
        has_fp16_weights=False,
        threshold=LLM_INT8_THRESHOLD,
    )
    int8.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    int8 = int8.to(x.device)  # Int8Params quantize on the move to the device
    if int8.weight.dtype != torch.int8:
        raise QuantizationUnsupportedError("bitsandbytes left the LLM.int8 weight unquantized")
    return int8(x).to(x.dtype), x @ weight.t()


def _int8_bnb(
    model: Any, device: torch.device, workdir: Path | None
) -> tuple[nn.Module, dict[str, Any]]:
    """LLM.int8 (bitsandbytes ``Linear8bitLt``): int8 weights with one fp32 scale per output
    row; at run time, input columns with an outlier above the threshold go through a 16-bit
    matmul and the rest through an int8 one. Loaded through transformers'
    ``BitsAndBytesConfig(load_in_8bit=True)``, as its users do, so that it saves and loads."""
    if workdir is None:
        raise ValueError("int8_bnb needs a `workdir` to save the model to and reload it from")
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    targets = target_linears(model)
    config = BitsAndBytesConfig(
        load_in_8bit=True,
        llm_int8_threshold=LLM_INT8_THRESHOLD,
        llm_int8_has_fp16_weight=False,
        llm_int8_skip_modules=_skipped_linears(model, targets),
    )
    loaded = _bnb_reload(model, config, device, workdir, "int8_bnb")
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    if set(layers) != set(targets) or any(m.weight.dtype != torch.int8 for m in layers.values()):
        raise QuantizationUnsupportedError(
            f"bitsandbytes quantized {len(layers)} layers to int8, expected {len(targets)}"
        )
    return loaded, {
        "library": f"bitsandbytes {bnb.__version__}",
        "algorithm": f"llm.int8 (bitsandbytes {bnb.__version__})",
        "config": {
            "load_in_8bit": True,
            "llm_int8_threshold": LLM_INT8_THRESHOLD,
            "llm_int8_has_fp16_weight": False,
        },
        "bits": 8,
        "storage": "int8 values (Int8Params), one fp32 scale per output row (SCB); outlier "
        "input columns are multiplied in 16 bits at run time, not stored apart",
    }


# --------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class QuantizeJob:
    """What a kernel quantizes: ``targets`` (names of ``target_linears``) of ``model``.

    A kernel (``TransformersSupport.kernel``) takes one and returns ``(model, info)``: the
    quantized model (``model`` itself, changed in place, or a new one) and what was done,
    with at least ``library``, ``algorithm`` (the algorithm and who implemented it) and
    ``bits``."""

    method: str
    model: nn.Module
    group_size: int
    device: torch.device
    calibration: torch.Tensor | None
    workdir: Path | None
    targets: set[str]


@dataclass(frozen=True)
class _Torchao8bit:
    """A method torchao applies and stores with one config: its kernel, probe and storage."""

    config: Callable[[int], Any]
    algorithm: str
    storage_text: str

    def __call__(self, job: QuantizeJob) -> tuple[nn.Module, dict[str, Any]]:
        import torchao

        config = self.config(job.group_size)
        _quantize_torchao(job.model, config, job.targets)
        return job.model, {
            "library": f"torchao {torchao.__version__}",
            "algorithm": f"{self.algorithm} (torchao {torchao.__version__})",
            "config": type(config).__name__,
            "bits": 8,
            "storage": self.storage_text,
        }

    def probe(self, layer: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _torchao_probe(self.config(64), layer, x)

    def storage(self, group_size: int, _device: torch.device, _dtype: torch.dtype) -> Any:
        return self.config(group_size)


_INT8_WEIGHT_ONLY = _Torchao8bit(
    _int8_weight_only_config,
    "rtn per output channel",
    "int8 values, one fp scale per output row (Int8Tensor)",
)
_INT8_W8A8 = _Torchao8bit(
    _int8_w8a8_config,
    "rtn per output channel, int8 activations per token",
    "int8 values, one fp scale per output row; activations quantized to int8 per token at "
    "run time (Int8Tensor)",
)
_FP8 = _Torchao8bit(
    _fp8_config,
    "fp8 e4m3 cast, dynamic activation scales",
    "float8 e4m3 values with scales (torchao Float8Tensor)",
)


def _int4_store(job: QuantizeJob, info: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    import torchao

    config, storage = _int4_config(job.group_size, job.device, job.model.dtype)  # type: ignore[arg-type]
    _quantize_torchao(job.model, config, job.targets)
    return job.model, {
        "algorithm": f"rtn (torchao {torchao.__version__})",
        **info,
        "library": f"torchao {torchao.__version__}",
        "config": f"{type(config).__name__}(group_size={job.group_size})",
        "bits": 4,
        "group_size": job.group_size,
        "storage": storage,
    }


def _rtn_kernel(job: QuantizeJob) -> tuple[nn.Module, dict[str, Any]]:
    return _int4_store(job, {})


def _awq_kernel(job: QuantizeJob) -> tuple[nn.Module, dict[str, Any]]:
    from evo_compress.fitness.model.quantize_library import library_unsupported

    if library_unsupported("awq", job.device) is None:
        return _library_int4(job, "awq")
    # Without the quantization environment: the hand-written AWQ, named in the record and
    # measured against llm-compressor's in BENCHMARKS.md (benchmarks/bench_awq.py).
    assert job.calibration is not None
    info = _awq(job.model, job.calibration, job.group_size, job.device)
    algorithm = "awq (evo-compress, no quantization environment)"
    return _int4_store(job, {"algorithm": algorithm, "awq": info})


def _gptq_kernel(job: QuantizeJob) -> tuple[nn.Module, dict[str, Any]]:
    return _library_int4(job, "gptq")


def _library_int4(job: QuantizeJob, algorithm: str) -> tuple[nn.Module, dict[str, Any]]:
    """int4 values, scales and zero points from llm-compressor's ``algorithm``, stored as
    torchao int4 tensors (``quantize_library``)."""
    import torchao

    from evo_compress.fitness.model.quantize_library import quantize_with_library

    assert job.calibration is not None
    targets = {n: m for n, m in target_linears(job.model).items() if n in job.targets}
    info = quantize_with_library(
        job.model,
        algorithm=algorithm,
        targets=targets,
        group_size=job.group_size,
        calibration=job.calibration,
        device=job.device,
        workdir=job.workdir,
    )
    return job.model, {
        **info,
        "library": f"{info['library']}, stored with torchao {torchao.__version__}",
        "config": f"IntxUnpackedToInt8Tensor(int4, block_size=(1, {job.group_size}))",
        "bits": 4,
        "group_size": job.group_size,
        "storage": _INT4_STORAGE,
    }


def _nf4_kernel(job: QuantizeJob) -> tuple[nn.Module, dict[str, Any]]:
    out_model, info = _nf4(job.model, job.group_size, job.device, job.workdir)
    return out_model, {**info, "bits": 4, "group_size": job.group_size}


def _int8_bnb_kernel(job: QuantizeJob) -> tuple[nn.Module, dict[str, Any]]:
    return _int8_bnb(job.model, job.device, job.workdir)


# --------------------------------------------------------------------------- entry point


def apply_quantization(
    model: nn.Module,
    recipe: Mapping[str, Any],
    device: torch.device | str,
    calibration: torch.Tensor | None = None,
    workdir: Path | None = None,
) -> QuantResult:
    """Apply the recipe's ``quant.method`` / ``quant.group_size`` to ``model`` on ``device``.

    The method's kernel is the one its registry entry names. ``calibration`` (input_ids
    [N, T]) is needed by methods that calibrate; ``workdir`` by the bitsandbytes ones (the
    save + reload). Raises ``QuantizationUnsupportedError`` for a method this device or model
    cannot run, never falling back silently.
    """
    dev = torch.device(device)
    method = str(recipe.get("quant.method", "none"))
    group_size = int(recipe.get("quant.group_size", DEFAULT_GROUP_SIZE))
    entry = _method(method)
    if entry is not None and entry.calibration:
        calibration = _check_calibration(calibration, method)
    reason = quantization_unsupported(
        method,
        dev,
        group_size=group_size if entry is not None and entry.grouped else None,
        model=model,
    )
    if reason is not None:
        raise QuantizationUnsupportedError(reason)

    start = time.perf_counter()
    targets = target_linears(model)
    n_weights = sum(m.weight.numel() for m in targets.values())
    details: dict[str, Any] = {"method": method, "device": str(dev)}
    assert entry is not None and entry.transformers is not None
    if entry.transformers.kernel is None:  # the method leaves the weights as they are
        details.update(bits=None, library=None, algorithm=None)
        bytes_ = model_weight_bytes(model)
        details.update(seconds=time.perf_counter() - start, weight_bytes=bytes_)
        return QuantResult(model, details, bytes_)

    job = QuantizeJob(method, model, group_size, dev, calibration, workdir, set(targets))
    out_model, info = resolve(entry.transformers.kernel)(job)
    missing = [k for k in ("library", "algorithm", "bits") if k not in info]
    if missing:
        raise EvaluationError(
            f"the kernel of `{method}` ({entry.transformers.kernel}) did not say its "
            f"{', '.join(missing)}"
        )
    details.update(info)

    quantized = target_linears(out_model)
    bytes_ = model_weight_bytes(out_model)
    # A plugin's kernel may keep its quantized data in buffers rather than parameters.
    layer_bytes = tensor_bytes(
        [t for m in quantized.values() for t in (*m.parameters(), *m.buffers())]
    )
    details.update(
        seconds=time.perf_counter() - start,
        quantized_layers=len(quantized),
        kept_full_precision="embeddings and output head (lm_head); norms and biases",
        weight_bytes=bytes_,
        quantized_layer_bytes=layer_bytes,
        bits_per_weight_measured=8 * layer_bytes / max(n_weights, 1),
        calibration_shape=list(calibration.shape) if calibration is not None else None,
    )
    return QuantResult(out_model, details, bytes_)


__all__ = [
    "LLM_INT8_THRESHOLD",
    "QuantResult",
    "QuantizationUnsupportedError",
    "QuantizeJob",
    "apply_quantization",
    "model_weight_bytes",
    "quantization_unsupported",
    "resolve",
    "target_linears",
    "tensor_bytes",
    "torchao_storage_config",
]
