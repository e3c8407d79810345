"""A closed-form, seeded synthetic landscape over the ``llm-compression`` space.

For tests and benchmarks only: every number it returns is computed, none is measured.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evo_compress.exceptions import ConfigError, RecipeError
from evo_compress.fitness._base import (
    EvaluationContext,
    EvaluationResult,
    Evaluator,
    Placement,
)
from evo_compress.fitness.noise import STDERR_KEY
from evo_compress.fitness.racing import FULL, QUICK, STAGE_KEY, RaceRule
from evo_compress.genomes import Recipe, SearchSpace
from evo_compress.methods import METHODS, CompressionMethod, SyntheticTraits
from evo_compress.objectives import OBJECTIVES

_SPACE = "llm-compression"
_GIB = 1024.0**3
_MIB = 1024.0**2

# Decode reads every weight once per step, so the step time is bandwidth over bytes; 2 TB/s
# is an H100-PCIe-class card, the device the defaults (80 GiB) describe.
_BANDWIDTH_B_PER_S = 2.0e12
# Dense bf16 throughput actually reached by decode GEMMs, well under the datasheet peak.
_BF16_FLOP_PER_S = 3.0e14
# A multi-query-attention 7B (Falcon-7B: 32 layers x 2 x 64 dims x bf16) keeps 8 KiB per token;
# a small KV cache is what keeps the weights the dominant memory term at the defaults.
_KV_BYTES_PER_TOKEN_7B = 8 * 1024
_IDLE_W, _MAX_W = 300.0, 700.0
# Recovery training energy per optimizer step and billion parameters.
_RECOVERY_J_PER_STEP_PER_B = 2000.0
# Share of the baseline accuracy a wrecked model keeps (roughly chance on multiple choice).
_ACCURACY_FLOOR = 0.3

# The quantization terms (degradation, dequantization and compute factors, calibration
# energy) are each method's `synthetic` traits in the method registry (evo_compress.methods).
# Pruning degradation a * (s / (1 - s)) ** p: a at s = 0.5 and the exponent p. Structured
# pruning hurts sooner (lower p) and more per unit sparsity than unstructured.
_PRUNE_CURVE = {
    "magnitude": (0.25, 2.5),
    "wanda": (0.10, 2.5),
    "structured_mlp": (0.50, 1.5),
    "structured_heads": (0.40, 1.5),
}
_PRUNE_CALIBRATION_J = {
    "none": 0.0,
    "magnitude": 1e4,
    "wanda": 1e5,
    "structured_mlp": 2e5,
    "structured_heads": 2e5,
}
# N:M fixes sparsity at 50% and costs more than unstructured 50%: fewer choices per block.
_NM_PENALTY = {"2:4": 2.0, "4:8": 1.5}
# Only 2:4 has sparse tensor cores; 4:8 saves storage but barely time.
_NM_SPEEDUP = {"2:4": 1.3, "4:8": 1.1}
# Index bits stored per kept weight (2:4: 2 bits; 4:8: log2(C(8,4)) / 4 ~ 1.5 bits).
_NM_INDEX_BITS = {"2:4": 2.0, "4:8": 1.53}
# Share of the parameters that MLP channels / attention heads hold in a Llama-like block.
_STRUCTURED_SHARE = {"structured_mlp": 2.0 / 3.0, "structured_heads": 1.0 / 3.0}
# Quantization and pruning errors compound: the cross term makes them super-additive.
_COMPOUND = 6.0
_ATTENTION_FACTOR = {
    "eager": 2.5,
    "sdpa": 1.15,
    "auto": 1.0,
    "flash_attention_2": 1.0,
    "flashinfer": 0.95,
}
_NOTE = "closed-form synthetic landscape, not a measurement"
# Share of an evaluation's cost spent before accuracy is measured (applying the recipe,
# latency): what racing's quick stage cannot save.
_APPLY_SHARE = 0.5
# Settings of the real-model back ends that name lm-eval tasks: refused with their own reason.
_TASK_SETTINGS = ("task", "tasks", "task_include_path")


class SyntheticSettings(BaseModel):
    """``evaluator.settings`` of the synthetic back end."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    n_params_b: float = Field(7.0, gt=0, description="Model size, billions of parameters")
    base_accuracy: float = Field(0.80, gt=0, le=1, description="Accuracy of the baseline")
    device_memory_gb: float | None = Field(
        None, gt=0, description="Device memory, GiB (default: hardware.memory_gb or 80)"
    )
    noise: float = Field(0.003, ge=0, description="Std-dev of the per-recipe noise")
    seed: int = Field(0, description="Seeds the per-recipe noise")
    cost_s: float = Field(0.0, ge=0, description="Seconds to sleep per evaluation")
    cost_spread: float = Field(
        0.0,
        ge=0,
        le=1,
        description="The pause varies per recipe by up to this fraction of cost_s, so "
        "parallel evaluations finish out of order (tests, benchmarks)",
    )
    fail_if: dict[str, list[Any]] = Field(
        default_factory=dict, description="gene -> values whose recipes fail (tests)"
    )
    context_tokens: int = Field(4096, ge=1, description="Context length per sequence")
    test_items: int = Field(
        250,
        ge=2,
        description="Test items the accuracy stands for (racing: a quick stage on k of them "
        "has stderr noise * sqrt(test_items / k))",
    )


def _settings_error(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"])
    field = f"`evaluator.settings.{path}`"
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "extra_forbidden" and path in _TASK_SETTINGS:
        return ConfigError(
            f"{field}: the synthetic evaluator scores no lm-eval tasks (it is a closed-form "
            "test landscape with one accuracy); use the transformers or vllm evaluator"
        )
    if kind == "extra_forbidden":
        known = ", ".join(SyntheticSettings.model_fields)
        return ConfigError(f"{field} is not a setting of the synthetic evaluator; known: {known}")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than_equal": "<="}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        shown = f"{bound:g}" if isinstance(bound, (int, float)) else repr(bound)
        message = f"must be {bounds[kind]} {shown}"
    else:
        message = err["msg"].replace("Input should be", "must be")
    return ConfigError(f"{field} {message}, got {err.get('input')!r}")


def parse_settings(settings: Mapping[str, Any], space: SearchSpace) -> SyntheticSettings:
    """Validate ``settings``; ``fail_if`` genes and values are checked against ``space``."""
    try:
        parsed = SyntheticSettings.model_validate(dict(settings))
    except ValidationError as exc:
        raise _settings_error(exc) from None
    fail_if: dict[str, list[Any]] = {}
    for gene_name, values in parsed.fail_if.items():
        field = f"`evaluator.settings.fail_if.{gene_name}`"
        if gene_name not in space.genes:
            close = difflib.get_close_matches(gene_name, list(space.genes), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ConfigError(f"{field}: unknown gene{hint} in search space `{space.name}`")
        try:
            # Canonical values, so 0.50 in the settings matches the recipe's 0.5.
            fail_if[gene_name] = [space.genes[gene_name].check(v) for v in values]
        except RecipeError as exc:
            raise ConfigError(f"{field}: {exc}") from None
    return parsed.model_copy(update={"fail_if": fail_if})


@dataclass(frozen=True)
class _Genes:
    """The recipe read with defaults for inactive genes, so formulas need no special cases."""

    quant: str
    group_size: int
    prune: str
    pattern: str
    sparsity: float
    recovery: str
    rank: int
    steps: int
    temperature: float
    kv_fp8: bool
    window: int | None
    max_num_seqs: int
    gpu_memory_utilization: float
    attention: str

    @property
    def method(self) -> CompressionMethod:
        return METHODS.get(self.quant, "quantization")

    @property
    def traits(self) -> SyntheticTraits:
        traits = self.method.synthetic
        if traits is None:  # capabilities() leaves such methods out of the space
            raise RecipeError(f"`quant.method` {self.quant} has no synthetic landscape terms")
        return traits

    @classmethod
    def read(cls, recipe: Recipe, space: SearchSpace) -> _Genes:
        def get(name: str) -> Any:
            return recipe.get(name, space.genes[name].default)

        prune = str(get("prune.method"))
        pattern = str(get("prune.pattern")) if prune in ("magnitude", "wanda") else "unstructured"
        return cls(
            quant=str(get("quant.method")),
            group_size=int(get("quant.group_size")),
            prune=prune,
            pattern=pattern,
            sparsity=0.5 if pattern in _NM_PENALTY else float(get("prune.sparsity")),
            recovery=str(get("recovery.method")),
            rank=int(get("recovery.lora_rank")),
            steps=int(get("recovery.steps")),
            temperature=float(get("recovery.temperature")),
            kv_fp8=get("kv.dtype") == "fp8",
            window=int(get("kv.window")) if bool(get("kv.sliding_window")) else None,
            max_num_seqs=int(get("serve.max_num_seqs")),
            gpu_memory_utilization=float(get("serve.gpu_memory_utilization")),
            attention=str(get("serve.attention_backend")),
        )


class SyntheticEvaluator(Evaluator):
    """Deterministic closed-form objectives with realistic shape; nothing is measured.

    Noise is a pure function of ``(seed, recipe.hash)``, so a recipe gets bit-identical
    objectives in any process and any call order.
    """

    name: ClassVar[str] = "synthetic"
    supports_racing: ClassVar[bool] = True

    def __init__(self, settings: Mapping[str, Any], context: EvaluationContext) -> None:
        super().__init__(settings, context)
        self._space = SearchSpace.builtin(_SPACE)
        self.config = parse_settings(settings, self._space)
        memory = self.config.device_memory_gb or context.hardware.memory_gb or 80.0
        self.device_memory_gb = float(memory)

    def capabilities(self) -> Mapping[str, Collection[Any] | None]:
        caps: dict[str, Collection[Any] | None] = {name: None for name in self._space.genes}
        if "quant.method" in caps:
            caps["quant.method"] = METHODS.names("quantization", backend="synthetic")
        return caps

    def fingerprint_data(self) -> dict[str, Any]:
        # Validated settings (defaults filled, 7 == 7.0), less the pause: it changes no result.
        data = super().fingerprint_data()
        # `test_items` shapes quick results only, which racing keys apart (quick_fingerprint).
        data["settings"] = self.config.model_dump(
            mode="json", exclude={"cost_s", "cost_spread", "test_items"}
        )
        return data

    def quick_fingerprint(self, quick_limit: int) -> str:
        from evo_compress.fitness.racing import quick_fingerprint

        extra = {"quick_limit": quick_limit, "test_items": self.config.test_items}
        return quick_fingerprint(self.cache_fingerprint(), extra)

    def cost_of(self, recipe: Recipe) -> float:
        """Seconds this recipe's evaluation pauses: cost_s, spread by a hash of the recipe."""
        digest = hashlib.sha256(f"cost:{recipe.hash}".encode()).digest()
        unit = int.from_bytes(digest[:8], "big") / 2**64 * 2.0 - 1.0  # in [-1, 1)
        return self.config.cost_s * (1.0 + self.config.cost_spread * unit)

    def _evaluate(self, recipe: Recipe, placement: Placement) -> EvaluationResult:
        if self.config.cost_s > 0:
            time.sleep(self.cost_of(recipe))
        return self._compute(recipe)

    def _evaluate_raced(
        self, recipe: Recipe, placement: Placement, race: RaceRule
    ) -> EvaluationResult:
        """The full result as without racing, or, when ``race`` stops it, a quick one: the
        accuracy of the first k of ``test_items`` items, the full accuracy's noise plus the
        extra noise of fewer items (so the full value is the quick one's continuation), and
        a pause of the apply share plus k / test_items of the rest."""
        full = self._compute(recipe)
        items = self.config.test_items
        k = race.quick_limit
        cost = self.cost_of(recipe) if self.config.cost_s > 0 else 0.0
        if full.ok and full.objectives is not None and k < items:
            rng = np.random.default_rng(
                int(
                    hashlib.sha256(f"{self.config.seed}:quick:{recipe.hash}".encode()).hexdigest(),
                    16,
                )
                % 2**63
            )
            extra = self.config.noise * math.sqrt(items / k - 1.0) * float(rng.standard_normal())
            accuracy = float(np.clip(full.objectives["accuracy"] + extra, 0.0, 1.0))
            objectives = {**full.objectives, "accuracy": accuracy}
            metadata = {
                **full.metadata,
                STAGE_KEY: QUICK,
                STDERR_KEY: self.config.noise * math.sqrt(items / k),
                "racing": {"items": k, "of": items},
            }
            if race.stop(objectives, metadata):
                time.sleep(cost * (_APPLY_SHARE + (1.0 - _APPLY_SHARE) * k / items))
                return EvaluationResult.success(objectives, metadata)
        time.sleep(cost)
        if not full.ok:
            return full
        metadata = {**full.metadata, STAGE_KEY: FULL, "racing": {"items": items, "of": items}}
        return EvaluationResult.success(full.objectives or {}, metadata)

    def _compute(self, recipe: Recipe) -> EvaluationResult:
        base_meta: dict[str, Any] = {"evaluator": self.name, "synthetic": True, "note": _NOTE}
        for gene_name, values in self.config.fail_if.items():
            if gene_name in recipe and recipe[gene_name] in values:
                reason = (
                    f"synthetic failure injected by `fail_if`: {gene_name} = {recipe[gene_name]}"
                )
                return EvaluationResult.failure(reason, base_meta)

        genes = _Genes.read(recipe, self._space)
        memory = self._memory(genes)
        budget_gib = genes.gpu_memory_utilization * self.device_memory_gb
        needs_gib = memory["total_mib"] * _MIB / _GIB
        if needs_gib > budget_gib:
            reason = (
                f"out of memory: needs {needs_gib:.1f} GiB, gpu_memory_utilization "
                f"{genes.gpu_memory_utilization:g} x {self.device_memory_gb:g} GiB allows "
                f"{budget_gib:.1f} GiB"
            )
            over = {"needed": memory["total_mib"], "limit": budget_gib * _GIB / _MIB}
            return EvaluationResult.failure(
                reason, {**base_meta, "memory_mib": memory, "over_limit": over}
            )

        rng = self._rng(recipe)
        z_accuracy, z_latency = rng.standard_normal(2)
        accuracy = self._accuracy(genes)
        latency = self._latency(genes, memory)
        noisy_accuracy = float(
            np.clip(accuracy["value"] + self.config.noise * z_accuracy, 0.0, 1.0)
        )
        latency_ms = latency["value_ms"] * math.exp(self.config.noise * z_latency)
        energy = self._energy(genes, latency_ms)
        compression_j = self._compression_energy(genes)
        intensity = self.context.carbon.grid_intensity_g_per_kwh
        serving_co2 = energy["j_per_1k_tokens"] / 3.6e6 * intensity
        amortised_co2 = (
            compression_j["total_j"]
            / 3.6e6
            * intensity
            * 1000.0
            / self.context.carbon.deployment_tokens
        )
        objectives = {
            "accuracy": noisy_accuracy,
            "latency": latency_ms,
            "memory": memory["total_mib"],
            "energy": energy["j_per_1k_tokens"],
            "co2": serving_co2 + amortised_co2,
        }
        metadata = {
            **base_meta,
            "objectives": {
                o.name: {"how": "synthetic", "unit": o.unit, "measured": False} for o in OBJECTIVES
            },
            # The accuracy is the landscape's value plus `noise` x N(0, 1): its standard
            # error is `noise`. No test items behind it, so no `accuracy_n`.
            STDERR_KEY: self.config.noise,
            "settings": self.config.model_dump(mode="json"),
            "device_memory_gb": self.device_memory_gb,
            "accuracy_terms": {**accuracy, "noise_z": float(z_accuracy)},
            "latency_terms_ms": {**latency, "noise_z": float(z_latency)},
            "memory_mib": memory,
            "power_w": energy["power_w"],
            "compression_energy_j": compression_j,
            "co2_g_per_1k_tokens": {
                "serving": serving_co2,
                "compression_amortised": amortised_co2,
            },
        }
        return EvaluationResult.success(objectives, metadata)

    # ------------------------------------------------------------------ landscape
    def _rng(self, recipe: Recipe) -> np.random.Generator:
        digest = hashlib.sha256(f"{self.config.seed}:{recipe.hash}".encode()).hexdigest()
        return np.random.default_rng(int(digest, 16) % 2**63)

    @property
    def _scale(self) -> float:
        return self.config.n_params_b / 7.0

    def _bits(self, genes: _Genes) -> float:
        """Stored bits per weight, scales included."""
        method = genes.method
        if method.grouped:  # one scale per group (nf4: an fp32 absmax per block)
            return method.weight_bits + method.scale_bits / genes.group_size
        return float(method.weight_bits)

    def _memory(self, genes: _Genes) -> dict[str, float]:
        bits = self._bits(genes)
        keep = 1.0
        if genes.prune in _STRUCTURED_SHARE:
            keep = 1.0 - _STRUCTURED_SHARE[genes.prune] * genes.sparsity
        elif genes.pattern in _NM_INDEX_BITS:
            # Half the values plus their position indices; unstructured sparsity is stored dense.
            keep = 0.5 + 0.5 * _NM_INDEX_BITS[genes.pattern] / bits
        weights = self.config.n_params_b * 1e9 * bits / 8.0 * keep
        if genes.recovery == "qlora":
            # QLoRA adapters stay unmerged next to the nf4 base (bf16, ~2.5M params per rank).
            weights += genes.rank * 2.5e6 * self._scale * 2.0
        kv_per_token = self._kv_bytes_per_token(genes)
        kv_tokens = min(genes.window or self.config.context_tokens, self.config.context_tokens)
        kv = genes.max_num_seqs * kv_tokens * kv_per_token
        activations = (0.25 + 0.008 * genes.max_num_seqs) * _GIB * math.sqrt(self._scale)
        runtime = 0.5 * _GIB  # CUDA context, graphs, allocator slack
        total = weights + kv + activations + runtime
        return {
            "weights_mib": weights / _MIB,
            "kv_cache_mib": kv / _MIB,
            "activations_mib": activations / _MIB,
            "runtime_mib": runtime / _MIB,
            "total_mib": total / _MIB,
            "bits_per_weight": bits,
            "weight_storage_fraction": keep,
        }

    def _kv_bytes_per_token(self, genes: _Genes) -> float:
        kv = _KV_BYTES_PER_TOKEN_7B * self._scale
        if genes.kv_fp8:
            kv *= 0.5
        if genes.prune == "structured_heads":
            kv *= 1.0 - genes.sparsity  # removed heads keep no keys or values
        return kv

    def _accuracy(self, genes: _Genes) -> dict[str, float]:
        # Larger models tolerate the same compression better.
        robustness = (7.0 / self.config.n_params_b) ** 0.25
        quant = genes.traits.degradation
        if genes.method.grouped:
            quant *= (genes.group_size / 128.0) ** 0.3
        quant *= robustness
        prune = 0.0
        if genes.prune in _PRUNE_CURVE:
            a, power = _PRUNE_CURVE[genes.prune]
            s = genes.sparsity
            prune = a * (s / (1.0 - s)) ** power * _NM_PENALTY.get(genes.pattern, 1.0)
            prune *= robustness
        weight_loss = quant + prune + _COMPOUND * quant * prune
        recovered = self._recovered_fraction(genes)
        kv = 0.003 if genes.kv_fp8 else 0.0
        window = 0.0
        if genes.window is not None and genes.window < self.config.context_tokens:
            short = 1.0 - genes.window / self.config.context_tokens
            window = 0.004 * short + 0.2 * max(0.0, 1.0 - genes.window / 2048.0) ** 2
        degradation = weight_loss * (1.0 - recovered) + kv + window
        base = self.config.base_accuracy
        value = base * (_ACCURACY_FLOOR + (1.0 - _ACCURACY_FLOOR) * math.exp(-degradation))
        return {
            "quantization": quant,
            "pruning": prune,
            "compound": _COMPOUND * quant * prune,
            "recovered_fraction": recovered,
            "kv_dtype": kv,
            "sliding_window": window,
            "degradation": degradation,
            "value": value,
        }

    def _recovered_fraction(self, genes: _Genes) -> float:
        """Share of the weight-compression loss that recovery training buys back."""
        if genes.recovery in ("lora", "qlora"):
            ceiling = 0.35 + 0.3 * math.log2(genes.rank / 4.0) / 4.0  # rank 4: .35, 64: .65
            if genes.recovery == "qlora":
                ceiling *= 0.9  # gradients through a 4-bit base are noisier
            tau = 400.0
        elif genes.recovery == "distill":
            ceiling = 0.7 * (1.0 - 0.06 * (genes.temperature - 2.0) ** 2)
            tau = 500.0
        else:
            return 0.0
        return ceiling * (1.0 - math.exp(-genes.steps / tau))

    def _latency(self, genes: _Genes, memory: dict[str, float]) -> dict[str, float]:
        batch = genes.max_num_seqs
        weights_bytes = memory["weights_mib"] * _MIB
        speedup = _NM_SPEEDUP.get(genes.pattern, 1.0)
        if genes.pattern in _NM_SPEEDUP:
            # Storage saving is not a speedup; the sparse kernel's speedup replaces it.
            weights_bytes /= memory["weight_storage_fraction"]
        if genes.method.weight_bits <= 4 and genes.pattern == "2:4":
            speedup = 1.15  # sparse x int4 kernels are less mature
        stream_s = weights_bytes / _BANDWIDTH_B_PER_S * genes.traits.dequant_factor / speedup
        dense_params = self.config.n_params_b * 1e9 * memory["weight_storage_fraction"]
        if genes.pattern in _NM_SPEEDUP:
            dense_params = self.config.n_params_b * 1e9
        compute_s = (
            2.0 * dense_params * batch / (_BF16_FLOP_PER_S * genes.traits.compute_factor)
        ) / speedup
        # A smooth roofline: bandwidth-bound at small batches, compute shows at large ones.
        gemm_s = math.hypot(stream_s, compute_s)
        ctx = self.config.context_tokens
        w = min(genes.window or ctx, ctx)
        mean_tokens = w - w * w / (2.0 * ctx)  # mean over decode positions of min(t, w)
        kv_s = batch * mean_tokens * self._kv_bytes_per_token(genes) / _BANDWIDTH_B_PER_S
        # Score / softmax kernels besides the KV reads; unfused (eager) kernels pay most here.
        attention_s = (kv_s + 0.5e-3 * math.sqrt(self._scale)) * _ATTENTION_FACTOR[genes.attention]
        overhead_s = 0.5e-3  # sampling, scheduling, launches
        adapter = 1.0 + 0.02 * genes.rank / 16.0 if genes.recovery == "qlora" else 1.0
        total_ms = (gemm_s * adapter + attention_s + overhead_s) * 1e3
        return {
            "weights_stream_ms": stream_s * 1e3,
            "compute_ms": compute_s * 1e3,
            "attention_ms": attention_s * 1e3,
            "overhead_ms": overhead_s * 1e3,
            "value_ms": total_ms,
        }

    def _energy(self, genes: _Genes, latency_ms: float) -> dict[str, float]:
        # Concurrency amortises each decode step over the batch, with diminishing returns.
        effective_batch = min(genes.max_num_seqs, 64) ** 0.8
        utilisation = effective_batch / (effective_batch + 8.0)
        power = _IDLE_W + (_MAX_W - _IDLE_W) * utilisation
        j_per_token = power * latency_ms / 1e3 / effective_batch
        return {"power_w": power, "j_per_1k_tokens": j_per_token * 1000.0}

    def _compression_energy(self, genes: _Genes) -> dict[str, float]:
        recovery = 0.0
        if genes.recovery != "none":
            per_step = _RECOVERY_J_PER_STEP_PER_B * self.config.n_params_b
            factor = {"lora": 1.0 + genes.rank / 128.0, "qlora": 1.25 + genes.rank / 128.0}
            # Distillation also runs the uncompressed teacher forward each step.
            recovery = genes.steps * per_step * factor.get(genes.recovery, 1.6)
        calibration = (
            genes.traits.calibration_j + _PRUNE_CALIBRATION_J[genes.prune]
        ) * self._scale
        return {
            "calibration_j": calibration,
            "recovery_j": recovery,
            "total_j": calibration + recovery,
        }
