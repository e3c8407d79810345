"""An estimate, made before loading, of the model's part of a recipe's peak memory: from the
model's config on the meta device (no weights), phase by phase (load, prune, recover,
quantize, serve), so that a recipe that cannot fit is refused instead of running out of memory.

It is an estimate: the formula (docs/config.md, "Memory estimate") counts tensors (weights as
each method stores them, masks, LoRA and optimizer state, activations kept for the backward
pass, the KV cache, the activations a CPU training step leaves in glibc's heap) and leaves out
what the Python runtime, the rest of the allocator's slack and the libraries add.
``benchmarks/bench_memory.py`` checks it against measured peaks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from evo_compress.methods import METHODS

MIB = 2**20
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Recipe defaults of the built-in space (a recipe may leave a gene out).
_DEFAULT_GROUP = 128
_DEFAULT_SPARSITY = 0.5
_DEFAULT_RANK = 16
# Activations a decoder layer keeps per token for its backward pass, in hidden-size and
# intermediate-size units of the compute dtype: the inputs of the four attention projections
# and two norms, q/k/v after RoPE, the attention output and the residuals (~12 x hidden); the
# gate, up, activation and product of the MLP (~4 x intermediate). Counted from the modules of
# a Llama-style block; the attention scores are not kept (SDPA recomputes them).
_ACT_HIDDEN = 12
_ACT_INTERMEDIATE = 4
# Logits in float32, their log-softmax and its gradient: three copies per position.
_LOGIT_COPIES = 3
# A teacher's precomputed logits keep this many per position when the vocabulary is larger.
TEACHER_TOP_K = 64
# On CPU the worker has glibc's malloc serve every allocation of this size or more with its
# own mmap (``pipeline._return_freed_memory``); a smaller tensor is carved from the heap.
MALLOC_MMAP_THRESHOLD = 1 << 20


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    part: str  # "attn", "mlp" or "other" (what structured pruning shrinks)
    decoder: bool  # inside a decoder block: pruned and given LoRA adapters

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class Inventory:
    """What the estimate needs of a model, read from its config on the meta device."""

    params: int  # every parameter, shared ones once
    linears: tuple[Linear, ...]  # the quantization targets: every nn.Linear but the head
    head_params: int  # the output head's, 0 when tied to the embeddings
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_position: int
    config_dtype: str | None

    @property
    def linear_params(self) -> int:
        return sum(lin.numel for lin in self.linears)

    @property
    def decoder_params(self) -> int:
        return sum(lin.numel for lin in self.linears if lin.decoder)


def _part(name: str) -> str:
    leaf = name.lower()
    if any(key in leaf for key in ("attn", "attention")):
        return "attn"
    if any(key in leaf for key in ("mlp", "feed_forward", "ffn")):
        return "mlp"
    return "other"


def inventory_of_config(config: Any) -> Inventory:
    """Build ``config``'s model on the meta device (no memory, no weights) and count it."""
    import torch
    from transformers import AutoModelForCausalLM

    from evo_compress.fitness.model._quiet import quiet_output

    # torchao (imported by transformers' modelling code and the quantization kernels) and torch
    # announce missing optional kernels on import: in the search or CLI process that would
    # print over the display.
    with quiet_output():
        from evo_compress.fitness.model.prune import decoder_linears
        from evo_compress.fitness.model.quantize import target_linears

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    decoder = set(decoder_linears(model))
    linears = tuple(
        Linear(name, lin.in_features, lin.out_features, _part(name), name in decoder)
        for name, lin in target_linears(model).items()
    )
    seen: set[int] = set()
    params = 0
    for param in model.parameters():  # tied weights are one parameter
        if id(param) not in seen:
            seen.add(id(param))
            params += param.numel()
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    return Inventory(
        params=params,
        linears=linears,
        head_params=0 if head is None or tied else head.weight.numel(),
        layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        intermediate=int(getattr(text, "intermediate_size", 0) or 4 * text.hidden_size),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=int(text.vocab_size),
        max_position=int(getattr(text, "max_position_embeddings", 0) or 2048),
        config_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
    )


def inventory_of_folder(path: Any) -> Inventory:
    """The inventory of the model in folder (or hub cache) ``path``: its config only."""
    from transformers import AutoConfig

    return inventory_of_config(AutoConfig.from_pretrained(path))


def load_dtype(dtype: str, device: str, inventory: Inventory) -> str:
    """The dtype the model is loaded in, as ``load.load_model`` resolves ``model.dtype``."""
    if dtype in _DTYPE_BYTES:
        return dtype
    if device.startswith("cpu"):
        return "float32"  # half precision kernels are slow or missing on CPU
    return inventory.config_dtype if inventory.config_dtype in _DTYPE_BYTES else "float32"


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes of the model's part of each phase's peak, with its parts. ``peak`` is
    the largest phase; its parts are what a refusal quotes."""

    phases: dict[str, dict[str, int]]
    dtype: str
    context: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def peak_bytes(self) -> int:
        return sum(self.phases[self.peak_phase].values())

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    def describe(self) -> str:
        """``estimated peak 812 MiB while recovering (weights 610, recovery 150, ...)``."""
        parts = ", ".join(
            f"{name} {value / MIB:,.0f}"
            for name, value in self.phases[self.peak_phase].items()
            if value > 0
        )
        return f"estimated peak {self.peak_mib:,.0f} MiB while {self.peak_phase} ({parts})"

    def to_data(self) -> dict[str, Any]:
        return {
            "estimate": True,
            "peak_mib": round(self.peak_mib, 3),
            "peak_phase": self.peak_phase,
            "dtype": self.dtype,
            "context": self.context,
            "phases_mib": {
                phase: {k: round(v / MIB, 3) for k, v in parts.items()}
                for phase, parts in self.phases.items()
            },
            "notes": list(self.notes),
        }


def _int(recipe: Mapping[str, Any], gene: str, default: int) -> int:
    value = recipe.get(gene, default)
    return (
        int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default
    )


def _kept_fractions(recipe: Mapping[str, Any], inv: Inventory) -> dict[str, float]:
    """The fraction of each part's weights that structured pruning keeps (1 elsewhere)."""
    method = recipe.get("prune.method", "none")
    sparsity = float(recipe.get("prune.sparsity", _DEFAULT_SPARSITY))
    if method == "structured_mlp":
        removed = min(round(sparsity * inv.intermediate), inv.intermediate - 1)
        return {"mlp": 1.0 - removed / inv.intermediate}
    if method == "structured_heads":
        removed = min(round(sparsity * inv.kv_heads), inv.kv_heads - 1)
        return {"attn": 1.0 - removed / inv.kv_heads}
    return {}


def _quantized_bytes(
    lin: Linear, keep: float, method: str, group: int, device: str, dtype_bytes: int
) -> float:
    """Bytes of one linear weight as ``method`` stores it on ``device``: values, plus a scale
    (and torchao's int8 zero point) per group or per output row."""
    entry = METHODS.get(method, "quantization")
    values = lin.numel * keep
    per_row = lin.in_features if not entry.grouped else group
    groups = values / max(per_row, 1)
    if method == "nf4":  # bitsandbytes: packed 4-bit, one fp32 absmax per block
        return values * entry.weight_bits / 8 + groups * entry.scale_bits / 8
    packed_int4 = (
        entry.weight_bits == 4
        and method != "gptq"
        and device.startswith("cuda")
        and dtype_bytes == 2
    )
    if packed_int4:  # torchao tinygemm: two values per byte, bf16 scale and zero per group
        return values / 2 + groups * 2 * dtype_bytes
    # torchao Int8Tensor / IntxUnpackedToInt8Tensor / Float8Tensor: one byte per value (int4
    # unpacked), a scale in the model dtype (fp32 for fp8) and an int8 zero point.
    scale = 4 if method == "fp8" else dtype_bytes
    return values + groups * (scale + 1)


def estimate_memory(
    inv: Inventory,
    recipe: Mapping[str, Any],
    *,
    device: str = "cpu",
    dtype: str = "auto",
    context: int | None = None,
    eval_batch: int = 32,
    recovery_batch: int = 16,
    recovery_tokens: int | None = None,
    recovery_batches: int = 32,
    calibration_samples: int = 64,
    gradient_checkpointing: bool = True,
) -> MemoryEstimate:
    """Estimate the model's part of peak memory for ``recipe`` (flat gene names), phase by
    phase. ``context`` is the served sequence length (prompt plus new tokens; default the
    model's ``max_position_embeddings``); ``recovery_tokens`` the length of a recovery text
    (default ``context``)."""
    dt = load_dtype(dtype, device, inv)
    b = _DTYPE_BYTES[dt]
    ctx = min(context or inv.max_position, inv.max_position)
    rec_tokens = recovery_tokens or ctx
    notes: list[str] = []

    full = inv.params * b
    keep = _kept_fractions(recipe, inv)
    removed = sum(lin.numel * (1 - keep.get(lin.part, 1.0)) for lin in inv.linears if lin.decoder)
    pruned = full - removed * b
    prune = recipe.get("prune.method", "none")
    masked = prune in ("magnitude", "wanda")
    # A bool keep-mask per pruned weight, held from pruning until quantization is done.
    masks = inv.decoder_params if masked else 0

    quant = str(recipe.get("quant.method", "none"))
    group = _int(recipe, "quant.group_size", _DEFAULT_GROUP)
    served = float(pruned)
    if quant != "none":
        for lin in inv.linears:
            kept = keep.get(lin.part, 1.0) if lin.decoder else 1.0
            served += _quantized_bytes(lin, kept, quant, group, device, b) - lin.numel * kept * b

    # On CPU, a checkpoint already in the load dtype is not copied: the weights are views on
    # the mmapped file. A weight that is replaced (quantized, or sliced by structured pruning)
    # leaves its pages mapped, and resident, as long as any other tensor (the embeddings)
    # still views the file: for the whole evaluation.
    mapped = device.startswith("cpu") and dt == inv.config_dtype
    structured = set(keep)
    if quant not in ("none", "nf4"):
        replaced = sum(lin.numel for lin in inv.linears) * b
    else:
        replaced = sum(lin.numel for lin in inv.linears if lin.decoder and lin.part in structured)
        replaced *= b
    held = replaced if mapped else 0
    held_after_prune = held if structured else 0
    if mapped and replaced:
        notes.append("the replaced weights' pages of the mmapped checkpoint stay resident")

    # Recovery state.
    method = recipe.get("recovery.method", "none")
    steps = _int(recipe, "recovery.steps", 200)
    recovering = method != "none" and steps > 0
    tokens = recovery_batch * rec_tokens
    act_per_token = (_ACT_HIDDEN * inv.hidden + _ACT_INTERMEDIATE * inv.intermediate) * b
    if gradient_checkpointing:  # layer inputs kept, one layer's activations recomputed at a time
        activations = tokens * (inv.layers * inv.hidden * b + act_per_token)
    else:
        activations = tokens * inv.layers * act_per_token
    activations += tokens * inv.vocab * 4 * _LOGIT_COPIES
    # Checkpointing frees each layer's activations, but on CPU those under the mmap threshold
    # are freed into glibc's heap, which does not reuse the chunks (likely because the small
    # allocations in between, such as LoRA's rank-wide products, split them): on the 106M model,
    # the heap grew over the first steps until it held about one forward pass's activations
    # as free chunks, all resident. Those tensors are counted as if kept (no checkpointing).
    heap = 0
    if gradient_checkpointing and device.startswith("cpu"):
        for width, count in ((inv.hidden, _ACT_HIDDEN), (inv.intermediate, _ACT_INTERMEDIATE)):
            size = tokens * width * b
            if size < MALLOC_MMAP_THRESHOLD:
                heap += count * inv.layers * size
    rank = _int(recipe, "recovery.lora_rank", _DEFAULT_RANK)
    lora_params = sum(
        rank * (lin.in_features + lin.out_features) for lin in inv.linears if lin.decoder
    )
    # Distillation's teacher: the uncompressed model's logits on the recovery batches, computed
    # before pruning (all of them, or the top k with int32 indices for a larger vocabulary).
    teacher = 0
    if recovering and method == "distill":
        k = min(inv.vocab, TEACHER_TOP_K)
        per_position = k * b if k == inv.vocab else k * (b + 4)
        teacher = min(steps, recovery_batches) * tokens * per_position
    phases: dict[str, dict[str, int]] = {"loading": {"weights": full}}
    if prune != "none":
        phases["pruning"] = {
            "weights": int(pruned) if structured else full,
            "mapped checkpoint": held_after_prune,
            "masks": masks,
            "teacher logits": teacher,
        }
    if recovering and method in ("lora", "distill"):
        if method == "lora":
            # Adapter weights, grads and two AdamW moments, all float32.
            state = lora_params * 4 * 4
        else:  # distill trains the decoder linears themselves: grads and two AdamW moments
            trained = sum(
                lin.numel * keep.get(lin.part, 1.0) for lin in inv.linears if lin.decoder
            )
            state = int(3 * trained * b)
        phases["recovering"] = {
            "weights": int(pruned),
            "mapped checkpoint": held_after_prune,
            "masks": masks,
            "recovery": state,
            "activations": int(activations),
            "freed activations (heap)": heap,
            "teacher logits": teacher,
        }
    if quant != "none":
        transient = 0.0
        if quant == "nf4":
            # Saved and reloaded as a second model while the first is still referenced.
            transient = served
            notes.append("nf4 reloads the model from disk: both copies are held for a moment")
        elif METHODS.get(quant, "quantization").calibration:
            # Calibration hidden states of one layer in and out, and one layer's GPTQ Hessians.
            per_layer = [lin for lin in inv.linears if lin.decoder][
                : max(1, len([lin for lin in inv.linears if lin.decoder]) // max(inv.layers, 1))
            ]
            hessians = sum(lin.in_features**2 * 4 for lin in per_layer) if quant == "gptq" else 0
            transient = calibration_samples * ctx * inv.hidden * b * 2 + hessians
        # Layer by layer, each float weight is freed once quantized, unless it is mapped.
        copies = served - (
            pruned
            - sum(
                lin.numel * (keep.get(lin.part, 1.0) if lin.decoder else 1.0)
                for lin in inv.linears
            )
            * b
        )
        phases["quantizing"] = {
            "weights": int(pruned),
            "mapped checkpoint": held_after_prune,
            "quantized copies": int(copies) if mapped and quant != "nf4" else 0,
            "masks": masks,
            "quantization": int(transient),
        }
    if recovering and method == "qlora":
        upcast = (inv.params - inv.linear_params) * max(0, 4 - b)  # peft upcasts the rest
        phases["recovering"] = {
            "weights": int(served + upcast),
            "recovery": lora_params * 16,
            "activations": int(activations),
            "freed activations (heap)": heap,
        }
    # Serving: the KV cache of `serve.max_num_seqs` sequences at the served context, plus the
    # evaluation's logits (lm-eval scores `eval_batch` sequences at a time).
    seqs = _int(recipe, "serve.max_num_seqs", 1)
    kv_bytes = 1 if recipe.get("kv.dtype", "auto") == "fp8" else b
    kv_tokens = ctx
    if recipe.get("kv.sliding_window", False):
        kv_tokens = min(ctx, _int(recipe, "kv.window", ctx))
    kv = seqs * kv_tokens * inv.layers * inv.kv_heads * inv.head_dim * 2 * kv_bytes
    if "attn" in keep:
        kv = int(kv * keep["attn"])
    serve_act = seqs * ctx * act_per_token // max(_ACT_HIDDEN, 1) + seqs * inv.vocab * 4
    eval_act = eval_batch * ctx * (inv.vocab * 4 * 2 + act_per_token // max(_ACT_HIDDEN, 1))
    phases["serving"] = {
        "weights": int(served),
        "mapped checkpoint": held,
        "KV cache": int(kv),
        "activations": int(max(serve_act, eval_act)),
    }
    return MemoryEstimate(phases, dt, ctx, notes)


def device_limit_mib(
    device: str, memory_gb: float | None, worker_limit_mib: float | None
) -> tuple[float | None, str]:
    """The memory limit a recipe's estimate is held to, and where it comes from."""
    if device.startswith("cuda"):
        if memory_gb is not None:
            return memory_gb * 1024, "`hardware.memory_gb`"
        return None, "none: set `hardware.memory_gb`"
    return worker_limit_mib, "`evaluator.settings.memory_limit_mib`"


def over_limit(estimate: MemoryEstimate, limit_mib: float | None, source: str) -> str | None:
    """The refusal of a recipe whose estimate exceeds ``limit_mib``, or None."""
    if limit_mib is None or not math.isfinite(limit_mib) or estimate.peak_mib <= limit_mib:
        return None
    return f"{estimate.describe()} exceeds the {limit_mib:,.0f} MiB limit ({source})"


__all__ = [
    "MALLOC_MMAP_THRESHOLD",
    "TEACHER_TOP_K",
    "Inventory",
    "MemoryEstimate",
    "MemoryGuard",
    "device_limit_mib",
    "estimate_memory",
    "inventory_of_config",
    "inventory_of_folder",
    "load_dtype",
    "over_limit",
]


class MemoryGuard:
    """A back end's memory check before loading: the model's inventory (from its config on
    the meta device) and the served context are worked out once, then every recipe's
    estimate is a few sums. ``settings`` are the back end's (``eval_batch_size``,
    ``recovery_batch_size``, ``calibration_samples``, ``max_new_tokens``)."""

    def __init__(
        self,
        model_path: Any,
        task: Mapping[str, Any],
        settings: Mapping[str, Any],
        device: str,
        dtype: str,
    ) -> None:
        self.model_path = model_path
        self.task = task
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self._inventory: Inventory | None = None
        self._lengths: tuple[int | None, int | None] | None = None

    @property
    def inventory(self) -> Inventory:
        if self._inventory is None:
            self._inventory = inventory_of_folder(self.model_path)
        return self._inventory

    def _token_lengths(self) -> tuple[int | None, int | None]:
        """The longest latency prompt and recovery text in tokens (None: not known)."""
        if self._lengths is None:
            from transformers import AutoTokenizer

            texts = list(self.task.get("train_texts") or [])[:512]
            prompts = list(self.task.get("prompts") or [t.split("=")[0] + "=" for t in texts[:64]])
            tokenizer = AutoTokenizer.from_pretrained(self.model_path)

            def longest(items: list[str]) -> int | None:
                return max((len(tokenizer(t)["input_ids"]) for t in items), default=None)

            self._lengths = (longest(prompts), longest(texts))
        return self._lengths

    def estimate(self, recipe: Mapping[str, Any]) -> MemoryEstimate:
        prompt, text = self._token_lengths()
        new_tokens = int(self.settings.get("max_new_tokens", 0))
        return estimate_memory(
            self.inventory,
            recipe,
            device=self.device,
            dtype=self.dtype,
            context=prompt + new_tokens if prompt is not None else None,
            eval_batch=int(self.settings.get("eval_batch_size", 32)),
            recovery_batch=int(self.settings.get("recovery_batch_size", 16)),
            recovery_tokens=text,
            # The task data's count (``calibration.samples`` resolved), else the setting.
            calibration_samples=int(
                self.task.get("calibration_samples")
                or self.settings.get("calibration_samples")
                or 64
            ),
            gradient_checkpointing=bool(self.settings.get("gradient_checkpointing", True)),
        )
