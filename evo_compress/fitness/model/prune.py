"""Apply a recipe's pruning genes to a transformers causal LM in place: unstructured and N:M
weight sparsity (magnitude, Wanda) or structured removal of MLP channels or attention heads.

Only the linear layers of the decoder blocks are pruned (Llama family: ``self_attn.{q,k,v,o}_proj``
and ``mlp.{gate,up,down}_proj``; Phi-3's fused ``qkv_proj`` and ``gate_up_proj``) and, in a
mixture of experts, the experts' fused 3-D ``gate_up_proj`` / ``down_proj`` parameters (one
``[out, in]`` matrix per expert). Embeddings, norms, the MoE router and ``lm_head`` are never
touched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from evo_compress.exceptions import RecipeError

__all__ = [
    "DEFAULT_SPARSITY",
    "PATTERNS",
    "PRUNE_METHODS",
    "PruneResult",
    "RecipeValueError",
    "apply_pruning",
    "collect_input_norms",
    "decoder_experts",
    "decoder_layers",
    "decoder_linears",
    "dequantized_weight",
    "kv_groups_kept",
    "measure_sparsity",
    "mlp_channels_kept",
    "reapply_masks",
    "restore_4bit_layout",
]

PRUNE_METHODS = ("none", "magnitude", "wanda", "structured_mlp", "structured_heads")
PATTERNS = ("unstructured", "2:4", "4:8")
# The defaults of `prune.sparsity` and `prune.pattern` in the built-in `llm-compression` space.
DEFAULT_SPARSITY = 0.5
_DEFAULT_PATTERN = "unstructured"


class RecipeValueError(RecipeError, ValueError):
    """A recipe gene has a value this back end cannot apply (a ``RecipeError`` that is also a
    ``ValueError``, so callers of the plain-torch API can catch either)."""


@dataclass(frozen=True)
class PruneResult:
    """What ``apply_pruning`` did.

    ``masks`` maps each pruned parameter name (as in ``model.named_parameters()``) to its bool
    keep-mask, for the unstructured and N:M methods, so training can re-apply them; it is empty
    for structured methods, whose weights are removed. ``sparsity`` is measured on the model
    after pruning: the fraction of the decoder linear weights (as counted before pruning) that
    are now zero or removed. ``details`` is plain JSON.
    """

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    sparsity: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- model structure


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
        if isinstance(base, nn.Module):
            return base
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers`` in the Llama family, else
    ``get_decoder().layers``), a peft wrapper looked through: the one rule pruning, recovery
    and the calibrated quantization kernels (AWQ) share.

    Raises:
        ValueError: the model has no non-empty ``nn.ModuleList`` of decoder layers there.
    """
    base = _unwrap(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return layers
    get_decoder = getattr(base, "get_decoder", None)
    if callable(get_decoder):
        layers = getattr(get_decoder(), "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise ValueError(
        f"{type(base).__name__} has no decoder layers at `model.layers`; pruning and "
        "calibrated quantization support Llama-family causal LMs"
    )


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer inside the decoder blocks, by module name as in the plain model's
    ``named_modules()`` (a peft wrapper is looked through: its ``base_layer`` is returned under
    the original name and LoRA adapters are skipped). bitsandbytes' ``Linear4bit`` is included.
    """
    base = _unwrap(model)
    layers = decoder_layers(base)
    prefix = next(name for name, module in base.named_modules() if module is layers)
    linears: dict[str, nn.Linear] = {}
    for name, module in layers.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue
        if parts[-1] == "base_layer":
            parts = parts[:-1]
        linears[f"{prefix}.{'.'.join(parts)}"] = module
    return linears


def decoder_experts(model: nn.Module) -> dict[str, nn.Module]:
    """The fused expert modules of a mixture of experts inside the decoder blocks, by module
    name (transformers 5: ``mlp.experts`` holding 3-D ``gate_up_proj`` [E, 2I, H] and
    ``down_proj`` [E, H, I] parameters, gate rows before up rows). Empty for dense models."""
    base = _unwrap(model)
    layers = decoder_layers(base)
    prefix = next(name for name, module in base.named_modules() if module is layers)
    experts: dict[str, nn.Module] = {}
    for name, module in layers.named_modules():
        gate_up = getattr(module, "gate_up_proj", None)
        down = getattr(module, "down_proj", None)
        if (
            isinstance(gate_up, torch.Tensor)
            and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3
            and down.dim() == 3
        ):
            experts[f"{prefix}.{name}"] = module
    return experts


def _expert_matrices(experts: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every fused expert parameter by parameter name: [E, out, in], one matrix per expert."""
    return {
        f"{name}.{param}": getattr(module, param)
        for name, module in experts.items()
        for param in ("gate_up_proj", "down_proj")
    }


def is_quantized(linear: nn.Module) -> bool:
    return hasattr(linear.weight, "quant_state")


def _canonical_4bit(data: torch.Tensor, quant_state: Any, copy_state: bool) -> tuple[Any, Any]:
    """bitsandbytes' 4-bit weight in its canonical layout. On CPUs with AVX512-BF16,
    ``Linear4bit`` re-packs its weight in place on the first eval-mode forward without grad
    (``packing_format_for_cpu``); neither ``dequantize_4bit`` nor the autograd path of
    ``matmul_4bit`` understands that layout (its backward is silently wrong), so undo it."""
    if not getattr(quant_state, "packing_format_for_cpu", False):
        return data, quant_state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    if copy_state:
        data, quant_state = data.clone(), copy.deepcopy(quant_state)
    return _convert_weight_packed_for_cpu_inverse(data, quant_state)


def restore_4bit_layout(model: nn.Module) -> int:
    """Put every CPU-packed 4-bit decoder weight back in bitsandbytes' canonical layout (in
    place, as bitsandbytes itself does before saving); returns how many were converted. Call
    before training through ``Linear4bit`` layers on CPU."""
    converted = 0
    for linear in decoder_linears(model).values():
        weight: Any = linear.weight
        quant_state = getattr(weight, "quant_state", None)
        if getattr(quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _canonical_4bit(weight.data, quant_state, False)
            converted += 1
    return converted


def dequantized_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight as a float matrix; bitsandbytes 4-bit weights are dequantized (nf4 has an
    exact zero code, so pruned zeros survive quantization and are still counted)."""
    weight = linear.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach()
    import bitsandbytes.functional as bnb_functional

    data, quant_state = _canonical_4bit(weight.data, quant_state, copy_state=True)
    dense: torch.Tensor = bnb_functional.dequantize_4bit(data, quant_state)
    return dense


def measure_sparsity(model: nn.Module, reference_numel: int | None = None) -> float:
    """Fraction of the decoder linear weights (and fused expert weights) of ``model`` that are
    zero.

    With ``reference_numel`` (the number of those weights before structured pruning), removed
    weights count as pruned too: ``1 - nonzero_now / reference_numel``.
    """
    total = 0
    nonzero = 0
    weights = [dequantized_weight(linear) for linear in decoder_linears(model).values()]
    weights += [p.detach() for p in _expert_matrices(decoder_experts(model)).values()]
    for weight in weights:
        total += weight.numel()
        nonzero += int(torch.count_nonzero(weight).item())
    denominator = total if reference_numel is None else reference_numel
    if denominator <= 0:
        raise ValueError("the model has no decoder linear weights to measure")
    return 1.0 - nonzero / denominator


def reapply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero every weight whose mask entry is False (after training or a LoRA merge moved it).

    Mask names are parameter names of the plain model (``model.layers.0.mlp.up_proj.weight``);
    a peft-wrapped model is looked through.
    """
    if not masks:
        return
    linears = decoder_linears(model)
    expert_params = _expert_matrices(decoder_experts(model))
    with torch.no_grad():
        for name, mask in masks.items():
            if name in expert_params:
                expert = expert_params[name]
                expert.masked_fill_(~mask.to(device=expert.device, dtype=torch.bool), 0)
                continue
            module_name, _, param_name = name.rpartition(".")
            linear = linears.get(module_name)
            if linear is None:
                raise ValueError(f"mask `{name}` names no decoder linear layer of the model")
            if is_quantized(linear):
                raise ValueError(
                    f"cannot re-apply mask `{name}` to a 4-bit quantized weight; apply masks "
                    "before quantization"
                )
            param = getattr(linear, param_name)
            if not isinstance(param, torch.Tensor) or param.shape != mask.shape:
                raise ValueError(
                    f"mask `{name}` has shape {tuple(mask.shape)}, the parameter "
                    f"{tuple(param.shape) if isinstance(param, torch.Tensor) else param!r}"
                )
            param.masked_fill_(~mask.to(device=param.device, dtype=torch.bool), 0)


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _expert_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden_states, top_k_index)`` of a fused experts forward call."""
    values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index") if k in kwargs]
    if len(values) < 2:
        raise ValueError("fused experts were called without hidden states and routing indices")
    return values[0], values[1]


def collect_input_norms(
    model: nn.Module, calibration: torch.Tensor, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """L2 norm of every input feature of every decoder linear layer over all calibration tokens:
    forward pre-hooks on the linears while ``calibration`` (input_ids [N, T]) runs through the
    model once, in eval mode and without gradients. Module name -> float32 [in_features].

    Fused experts get one entry per parameter (``...experts.gate_up_proj`` -> [E, hidden],
    ``...experts.down_proj`` -> [E, intermediate]) over the tokens routed to each expert."""
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2:
        raise ValueError("calibration must be an input_ids tensor of shape [N, T]")
    if calibration.dtype not in (torch.int64, torch.int32) or calibration.numel() == 0:
        raise ValueError(
            f"calibration must be a non-empty integer (token id) tensor, got {calibration.dtype}"
        )
    linears = decoder_linears(model)
    squares: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            total = (x * x).sum(dim=0)
            squares[name] = squares[name] + total if name in squares else total

        return hook

    def make_expert_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden, top_k_index = _expert_inputs(args, kwargs)
            gate_up: torch.Tensor = module.gate_up_proj  # type: ignore[assignment]
            act: Any = module.act_fn
            experts, double, width = gate_up.shape
            x_sq = gate_up.new_zeros(experts, width, dtype=torch.float32)
            h_sq = gate_up.new_zeros(experts, double // 2, dtype=torch.float32)
            hidden = hidden.detach().reshape(-1, width)
            index = top_k_index.reshape(hidden.shape[0], -1)
            for expert in range(experts):
                tokens = (index == expert).any(dim=-1)
                if not bool(tokens.any()):
                    continue
                x = hidden[tokens]
                # The expert's own down_proj input: act(gate x) * (up x), as its forward has it.
                gate, up = nn.functional.linear(x, gate_up[expert].detach()).chunk(2, dim=-1)
                h = (act(gate) * up).float()
                x_sq[expert] = (x.float() ** 2).sum(dim=0)
                h_sq[expert] = (h**2).sum(dim=0)
            for param, total in (("gate_up_proj", x_sq), ("down_proj", h_sq)):
                key = f"{name}.{param}"
                squares[key] = squares[key] + total if key in squares else total

        return hook

    for name, linear in linears.items():
        handles.append(linear.register_forward_pre_hook(make_hook(name)))
    for name, module in decoder_experts(model).items():
        handles.append(module.register_forward_pre_hook(make_expert_hook(name), with_kwargs=True))
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, calibration.shape[0], batch_size):
                chunk = calibration[start : start + batch_size].to(device=device, dtype=torch.long)
                model(input_ids=chunk, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = sorted(set(linears) - set(squares))
    if missing:
        raise ValueError(f"calibration never reached decoder linear layer(s) {missing[:3]}")
    return {name: total.sqrt() for name, total in squares.items()}


# ---------------------------------------------------------------------------- recipe genes


def _prune_genes(recipe: Mapping[str, Any]) -> tuple[str, str | None, float]:
    method = recipe.get("prune.method", "none")
    if method not in PRUNE_METHODS:
        raise RecipeValueError(
            f"`prune.method` must be one of {', '.join(PRUNE_METHODS)}, got {method!r}"
        )
    pattern: str | None = None
    if method in ("magnitude", "wanda"):
        pattern = recipe.get("prune.pattern", _DEFAULT_PATTERN)
        if pattern not in PATTERNS:
            raise RecipeValueError(
                f"`prune.pattern` must be one of {', '.join(PATTERNS)}, got {pattern!r}"
            )
    if method == "none":
        return method, pattern, 0.0
    if pattern in ("2:4", "4:8"):
        return method, pattern, 0.5
    sparsity = recipe.get("prune.sparsity", DEFAULT_SPARSITY)
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, int | float)
        or not math.isfinite(sparsity)
        or not 0.0 <= sparsity < 1.0
    ):
        raise RecipeValueError(f"`prune.sparsity` must be a number in [0, 1), got {sparsity!r}")
    return method, pattern, float(sparsity)


# ---------------------------------------------------------------------------- unstructured / N:M


def _unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the ``round(sparsity * in_features)`` lowest scores of every row."""
    rows, cols = score.shape
    prune = round(sparsity * cols)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=score.device)
    if prune > 0:
        lowest = torch.argsort(score, dim=1, stable=True)[:, :prune]
        mask.scatter_(1, lowest, False)
    return mask


def _nm_mask(score: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    """Keep-mask keeping the ``n`` highest scores in every group of ``m`` consecutive inputs."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"`{name}` has {cols} input features, not a multiple of {m} ({n}:{m})")
    groups = score.reshape(rows, cols // m, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def _prune_weights(
    model: nn.Module,
    method: str,
    pattern: str,
    sparsity: float,
    calibration: torch.Tensor | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    linears = decoder_linears(model)
    norms = (
        collect_input_norms(model, calibration)
        if method == "wanda" and calibration is not None
        else None
    )
    masks: dict[str, torch.Tensor] = {}
    per_layer: dict[str, float] = {}
    for name, linear in linears.items():
        if is_quantized(linear):
            raise ValueError(f"`{name}` is 4-bit quantized; prune before quantization")
        weight = linear.weight
        score = weight.detach().abs().float()
        if norms is not None:
            score = score * norms[name].to(score.device)[None, :]
        if pattern == "unstructured":
            mask = _unstructured_mask(score, sparsity)
        else:
            n, m = (int(part) for part in pattern.split(":"))
            mask = _nm_mask(score, n, m, name)
        with torch.no_grad():
            weight.masked_fill_(~mask, 0)
        masks[f"{name}.weight"] = mask
        per_layer[name] = round(1.0 - int(torch.count_nonzero(weight).item()) / weight.numel(), 6)
    for name, param in _expert_matrices(decoder_experts(model)).items():
        # One [out, in] matrix per expert, pruned like a linear layer's weight; Wanda weighs
        # it by the norms of the inputs routed to that expert.
        score = param.detach().abs().float()
        if norms is not None:
            score = score * norms[name].to(score.device)[:, None, :]
        experts, rows, cols = score.shape
        flat = score.reshape(experts * rows, cols)
        if pattern == "unstructured":
            mask = _unstructured_mask(flat, sparsity)
        else:
            n, m = (int(part) for part in pattern.split(":"))
            mask = _nm_mask(flat, n, m, name)
        mask = mask.reshape(experts, rows, cols)
        with torch.no_grad():
            param.masked_fill_(~mask, 0)
        masks[name] = mask
        per_layer[name] = round(1.0 - int(torch.count_nonzero(param).item()) / param.numel(), 6)
    return masks, {"comparison_group": "output_row", "layers": per_layer}


# ---------------------------------------------------------------------------- structured


def _slice_linear(
    linear: nn.Linear,
    out_index: torch.Tensor | None = None,
    in_index: torch.Tensor | None = None,
) -> nn.Linear:
    """A new ``nn.Linear`` with only the given output rows / input columns of ``linear``."""
    if is_quantized(linear):
        raise ValueError("cannot slice a 4-bit quantized linear layer; prune before quantization")
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if out_index is not None:
        weight = weight.index_select(0, out_index.to(weight.device))
        if bias is not None:
            bias = bias.index_select(0, out_index.to(bias.device))
    if in_index is not None:
        weight = weight.index_select(1, in_index.to(weight.device))
    new = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None and new.bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _names_by_id(model: nn.Module) -> dict[int, str]:
    return {id(linear): name for name, linear in decoder_linears(model).items()}


MLP_CHANNEL_MULTIPLE = 32


def mlp_channels_kept(size: int, sparsity: float, multiple: int = MLP_CHANNEL_MULTIPLE) -> int:
    """MLP channels ``structured_mlp`` keeps of ``size`` at ``sparsity``: at least one, and a
    multiple of ``multiple`` (32, or the recipe's int4 group size) when ``size`` is one, since
    group quantization and int4 kernels need widths that divide evenly."""
    keep = size - min(round(sparsity * size), size - 1)
    if size % multiple == 0:
        keep = max(multiple, round(keep / multiple) * multiple)
    return keep


def _prune_mlp_channels(
    model: nn.Module,
    sparsity: float,
    calibration: torch.Tensor | None,
    multiple: int = MLP_CHANNEL_MULTIPLE,
) -> dict[str, Any]:
    config: Any = model.config
    size = int(config.intermediate_size)
    requested = round(sparsity * size)
    keep = mlp_channels_kept(size, sparsity, multiple)
    remove = size - keep
    norms = collect_input_norms(model, calibration) if calibration is not None else None
    names = _names_by_id(model)
    expert_names = {id(m): n for n, m in decoder_experts(model).items()}
    layouts: set[str] = set()
    for layer in decoder_layers(model):
        mlp: Any = layer.mlp
        experts = getattr(mlp, "experts", None)
        if experts is not None and id(experts) in expert_names:
            layouts.add("moe_experts")
            _prune_expert_channels(experts, keep, size, norms, expert_names[id(experts)])
            continue
        if isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear):  # Phi-3: gate rows, up rows
            layouts.add("fused_gate_up")
            fused, down = mlp.gate_up_proj, mlp.down_proj
            gate_w, up_w = fused.weight.detach().float().chunk(2, dim=0)
        elif all(isinstance(getattr(mlp, n, None), nn.Linear) for n in _GATED):
            layouts.add("gated")
            fused, down = None, mlp.down_proj
            gate_w = mlp.gate_proj.weight.detach().float()
            up_w = mlp.up_proj.weight.detach().float()
        else:
            raise ValueError(
                f"{type(mlp).__name__} has neither gate_proj/up_proj/down_proj, a fused "
                "gate_up_proj nor fused experts; structured_mlp cannot prune it"
            )
        if not gate_w.shape[0] == up_w.shape[0] == down.in_features == size:
            raise ValueError(
                f"MLP of {type(layer).__name__} is not {size} channels wide; structured_mlp needs "
                "a uniform `intermediate_size`"
            )
        down_columns = down.weight.detach().float().pow(2).sum(dim=0)
        if norms is not None:
            # Activation-aware (Wanda-like, per channel): ||X_c||^2 * ||W_down[:, c]||^2, where
            # X_c is the c-th input of down_proj = act(gate x) * (up x) on calibration tokens.
            score = norms[names[id(down)]].to(down_columns.device).pow(2) * down_columns
        else:
            score = gate_w.norm(dim=1) * up_w.norm(dim=1) * down_columns.sqrt()
        kept = torch.topk(score, keep).indices.sort().values
        if fused is not None:
            mlp.gate_up_proj = _slice_linear(fused, out_index=torch.cat([kept, kept + size]))
        else:
            mlp.gate_proj = _slice_linear(mlp.gate_proj, out_index=kept)
            mlp.up_proj = _slice_linear(mlp.up_proj, out_index=kept)
        mlp.down_proj = _slice_linear(down, in_index=kept)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
    config.intermediate_size = keep
    details: dict[str, Any] = {
        "unit": "mlp_channel",
        "layout": sorted(layouts),
        "score": "activation" if norms is not None else "weight_norm",
        "units_before": size,
        "units_removed": remove,
        "units_after": keep,
        "unit_sparsity": remove / size,
    }
    if "moe_experts" in layouts:
        details["experts"] = "every expert keeps the same number of its own channels"
    if remove != requested:
        details["adjusted"] = (
            f"removed {remove} channels instead of {requested} to keep a width of {keep}"
        )
    return details


_GATED = ("gate_proj", "up_proj", "down_proj")


def _prune_expert_channels(
    experts: nn.Module,
    keep: int,
    size: int,
    norms: Mapping[str, torch.Tensor] | None,
    name: str,
) -> None:
    """Keep ``keep`` of each expert's ``size`` intermediate channels, chosen per expert (the
    fused parameters stay 3-D: every expert keeps the same count)."""
    gate_up: torch.Tensor = experts.gate_up_proj  # type: ignore[assignment]
    down: torch.Tensor = experts.down_proj  # type: ignore[assignment]
    if gate_up.shape[1] != 2 * size or down.shape[2] != size:
        raise ValueError(
            f"experts of {name} are not {size} channels wide; structured_mlp needs a uniform "
            "`intermediate_size`"
        )
    down_columns = down.detach().float().pow(2).sum(dim=1)  # [E, I]
    if norms is not None:
        score = norms[f"{name}.down_proj"].to(down_columns.device).pow(2) * down_columns
    else:
        gate_w, up_w = gate_up.detach().float().chunk(2, dim=1)
        score = gate_w.norm(dim=2) * up_w.norm(dim=2) * down_columns.sqrt()
    kept = torch.topk(score, keep, dim=1).indices.sort(dim=1).values  # [E, keep]
    rows = torch.cat([kept, kept + size], dim=1)
    new_gate_up = torch.stack([gate_up.detach()[e].index_select(0, r) for e, r in enumerate(rows)])
    new_down = torch.stack([down.detach()[e].index_select(1, k) for e, k in enumerate(kept)])
    experts.gate_up_proj = nn.Parameter(new_gate_up, requires_grad=gate_up.requires_grad)
    experts.down_proj = nn.Parameter(new_down, requires_grad=down.requires_grad)
    for attr in ("intermediate_dim", "intermediate_size"):
        if isinstance(getattr(experts, attr, None), int):
            setattr(experts, attr, keep)


def _config_accepts(config: Any, heads: int, kv_heads: int) -> bool:
    """Whether the config class validates with these head counts (transformers 5 Llama configs
    require ``hidden_size % num_attention_heads == 0`` on save and load)."""
    trial = copy.deepcopy(config)
    trial.num_attention_heads = heads
    trial.num_key_value_heads = kv_heads
    validate = getattr(trial, "validate", None)
    if not callable(validate):
        return True
    try:
        validate()
    except Exception:
        return False
    return True


def kv_groups_kept(config: Any, sparsity: float) -> int:
    """KV groups (a KV head and its query heads) ``structured_heads`` keeps at ``sparsity``:
    ``round(sparsity * num_key_value_heads)`` removed, at least one kept, moved to the nearest
    count the config class accepts (ties go to removing fewer)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % kv_heads:
        raise ValueError(f"{heads} attention heads are not a multiple of {kv_heads} KV heads")
    group = heads // kv_heads
    target_keep = kv_heads - min(round(sparsity * kv_heads), kv_heads - 1)
    return min(
        (k for k in range(1, kv_heads + 1) if _config_accepts(config, k * group, k)),
        key=lambda k: (abs(k - target_keep), -k),
    )


def _prune_heads(
    model: nn.Module, sparsity: float, calibration: torch.Tensor | None
) -> dict[str, Any]:
    config: Any = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    keep = kv_groups_kept(config, sparsity)
    group = heads // kv_heads
    layers = decoder_layers(model)
    head_dim = int(getattr(layers[0].self_attn, "head_dim", 0) or config.hidden_size // heads)

    requested = round(sparsity * kv_heads)
    target_keep = kv_heads - min(requested, kv_heads - 1)
    remove = kv_heads - keep
    norms = collect_input_norms(model, calibration) if calibration is not None else None
    names = _names_by_id(model)
    for layer in layers:
        attn: Any = layer.self_attn
        qkv = getattr(attn, "qkv_proj", None)  # Phi-3: [q rows | k rows | v rows]
        o = attn.o_proj
        if isinstance(qkv, nn.Linear):
            if qkv.out_features != (heads + 2 * kv_heads) * head_dim:
                raise ValueError("qkv_proj does not match the config's head counts")
        elif (
            attn.q_proj.out_features != heads * head_dim
            or attn.k_proj.out_features != kv_heads * head_dim
        ):
            raise ValueError("attention projections do not match the config's head counts")
        columns = o.weight.detach().float().pow(2).sum(dim=0)
        if norms is not None:
            columns = columns * norms[names[id(o)]].to(columns.device).pow(2)
        score = columns.reshape(kv_heads, group * head_dim).sum(dim=1)
        kept_groups = torch.topk(score, keep).indices.sort().values.tolist()
        q_rows = torch.cat(
            [torch.arange(g * group * head_dim, (g + 1) * group * head_dim) for g in kept_groups]
        )
        kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in kept_groups])
        if isinstance(qkv, nn.Linear):
            k_start, v_start = heads * head_dim, (heads + kv_heads) * head_dim
            fused_rows = torch.cat([q_rows, kv_rows + k_start, kv_rows + v_start])
            attn.qkv_proj = _slice_linear(qkv, out_index=fused_rows)
        else:
            attn.q_proj = _slice_linear(attn.q_proj, out_index=q_rows)
            attn.k_proj = _slice_linear(attn.k_proj, out_index=kv_rows)
            attn.v_proj = _slice_linear(attn.v_proj, out_index=kv_rows)
        attn.o_proj = _slice_linear(o, in_index=q_rows)
        # Attributes some attention classes cache (older transformers, other families).
        for attr in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, keep * group)
        for attr in ("num_key_value_heads", "num_kv_heads"):
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, keep)
        if isinstance(getattr(attn, "num_key_value_groups", None), int):
            attn.num_key_value_groups = group
        own_config = getattr(attn, "config", None)
        if own_config is not None and own_config is not config:
            own_config.num_attention_heads = keep * group
            own_config.num_key_value_heads = keep
            own_config.head_dim = head_dim
    # head_dim stays: pin it so a reload does not derive hidden_size // num_attention_heads.
    config.head_dim = head_dim
    config.num_attention_heads = keep * group
    config.num_key_value_heads = keep
    details: dict[str, Any] = {
        "unit": "kv_group",
        "heads_per_group": group,
        "head_dim": head_dim,
        "score": "activation" if norms is not None else "weight_norm",
        "units_before": kv_heads,
        "units_removed": remove,
        "units_after": keep,
        "unit_sparsity": remove / kv_heads,
        "requested_units_removed": requested,
    }
    if remove != requested:
        reasons = []
        if requested > kv_heads - 1:
            reasons.append("at least one KV group is kept")
        if keep != target_keep:
            reasons.append(
                f"{type(config).__name__} rejects {target_keep * group} heads "
                f"(hidden_size {config.hidden_size})"
            )
        details["adjusted"] = (
            f"removed {remove} of {kv_heads} KV groups instead of {requested}: "
            + "; ".join(reasons)
        )
    return details


# ---------------------------------------------------------------------------- entry point


def apply_pruning(
    model: nn.Module,
    recipe: Mapping[str, Any],
    calibration: torch.Tensor | None = None,
) -> PruneResult:
    """Prune ``model`` in place as the recipe's ``prune.*`` genes say.

    - ``magnitude``: drop the smallest ``|W|`` within each output row (the same comparison
      group as Wanda, so the two differ only by activation awareness).
    - ``wanda``: drop the smallest ``|W_ij| * ||X_j||_2`` within each output row, with input
      norms from one pass of ``calibration`` (input_ids [N, T], required) through the dense
      model (the paper's sequential layer-by-layer variant is not used).
    - patterns: ``unstructured`` prunes ``round(prune.sparsity * in_features)`` weights per row;
      ``2:4`` / ``4:8`` keep the N best of every M consecutive inputs of a row (50%).
    - ``structured_mlp``: removes ``round(sparsity * intermediate_size)`` MLP channels in every
      layer (``||gate_c|| * ||up_c|| * ||down_c||``, or ``||X_c||^2 ||down_c||^2`` with
      calibration) and updates ``config.intermediate_size``.
    - ``structured_heads``: removes ``round(sparsity * num_key_value_heads)`` KV groups (a KV
      head and its query heads) in every layer, scored by the squared norm of their ``o_proj``
      input columns (activation-weighted with calibration); at least one group is kept and the
      count moves to the nearest one the config class accepts (``details['adjusted']``).
    """
    method, pattern, sparsity = _prune_genes(recipe)
    if method == "wanda" and calibration is None:
        raise ValueError(
            "prune.method `wanda` needs calibration token ids (a LongTensor [N, T]) to weigh "
            "weights by input activation norms; got calibration=None"
        )
    linears = decoder_linears(model)
    quantized = [name for name, linear in linears.items() if is_quantized(linear)]
    if quantized and method != "none":
        raise ValueError(
            f"`{quantized[0]}` is 4-bit quantized; prune the full-precision model, then quantize"
        )
    dense_numel = sum(linear.in_features * linear.out_features for linear in linears.values())
    dense_numel += sum(p.numel() for p in _expert_matrices(decoder_experts(model)).values())
    masks: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    if method in ("magnitude", "wanda"):
        assert pattern is not None
        masks, extra = _prune_weights(model, method, pattern, sparsity, calibration)
    elif method == "structured_mlp":
        # A later 4-bit quantization needs widths its group size divides.
        multiple = int(recipe.get("quant.group_size", MLP_CHANNEL_MULTIPLE))
        extra = _prune_mlp_channels(model, sparsity, calibration, multiple)
    elif method == "structured_heads":
        extra = _prune_heads(model, sparsity, calibration)
    measured = measure_sparsity(model, reference_numel=dense_numel)
    details: dict[str, Any] = {
        "method": method,
        "pattern": pattern,
        "requested_sparsity": sparsity,
        "measured_sparsity": measured,
        "calibration_tokens": (
            int(calibration.numel())
            if calibration is not None
            and method in ("wanda", "structured_mlp", "structured_heads")
            else 0
        ),
        "weights_before": dense_numel,
        **extra,
    }
    return PruneResult(masks=masks, sparsity=measured, details=details)
