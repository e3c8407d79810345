"""Pruning and recovery training on tiny random Llama models (CPU, seeded, fast)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from evo_compress.fitness.model.prune import (  # noqa: E402
    DEFAULT_SPARSITY,
    PruneResult,
    apply_pruning,
    decoder_linears,
    dequantized_weight,
)
from evo_compress.fitness.model.recover import (  # noqa: E402
    DEFAULT_LORA_RANK,
    DEFAULT_STEPS,
    DEFAULT_TEMPERATURE,
    apply_recovery,
    distillation_loss,
    measure_sparsity,
    reapply_masks,
)

VOCAB = 32


def tiny_model(
    seed: int = 0, hidden: int = 64, heads: int = 4, kv_heads: int = 4, inter: int = 128
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tokens(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def calibration() -> torch.Tensor:
    return tokens(8, 16, seed=1)


def memorisation_batch(seed: int = 2) -> dict[str, torch.Tensor]:
    ids = tokens(4, 16, seed)
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids).logits
    return out


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def linear_numel(model: nn.Module) -> int:
    return sum(linear.weight.numel() for linear in decoder_linears(model).values())


def assert_masks_hold(model: nn.Module, result: PruneResult) -> None:
    params = dict(model.named_parameters())
    for name, mask in result.masks.items():
        assert torch.all(params[name][~mask] == 0), name


# ---------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_reaches_requested_sparsity(
    method: str, sparsity: float, calibration: torch.Tensor
) -> None:
    model = tiny_model()
    recipe = {"prune.method": method, "prune.pattern": "unstructured", "prune.sparsity": sparsity}
    result = apply_pruning(model, recipe, calibration)
    # Every row of every layer loses round(sparsity * in_features) weights.
    expected_zeros = sum(
        linear.out_features * round(sparsity * linear.in_features)
        for linear in decoder_linears(model).values()
    )
    assert result.sparsity == pytest.approx(expected_zeros / linear_numel(model), abs=1e-12)
    assert result.sparsity == pytest.approx(sparsity, abs=0.01)
    assert measure_sparsity(model) == pytest.approx(result.sparsity)
    assert set(result.masks) == {f"{name}.weight" for name in decoder_linears(model)}
    for name, mask in result.masks.items():
        row_zeros = (~mask).sum(dim=1)
        assert torch.all(row_zeros == round(sparsity * mask.shape[1])), name
    assert_masks_hold(model, result)
    assert torch.isfinite(logits(model, calibration)).all()
    json.dumps(result.details, allow_nan=False)
    assert result.details["method"] == method
    assert result.details["requested_sparsity"] == sparsity


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_structure_holds_in_every_group(
    method: str, pattern: str, n: int, m: int, calibration: torch.Tensor
) -> None:
    model = tiny_model()
    result = apply_pruning(model, {"prune.method": method, "prune.pattern": pattern}, calibration)
    assert result.sparsity == 0.5
    assert result.details["requested_sparsity"] == 0.5
    for name, linear in decoder_linears(model).items():
        weight = linear.weight.detach()
        groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=-1)
        assert torch.all(groups == n), name
        mask = result.masks[f"{name}.weight"]
        assert torch.equal(mask, weight != 0)
    # lm_head and embeddings are never pruned.
    assert torch.count_nonzero(model.lm_head.weight) == model.lm_head.weight.numel()
    assert torch.isfinite(logits(model, calibration)).all()


def test_wanda_needs_calibration() -> None:
    with pytest.raises(ValueError, match="calibration"):
        apply_pruning(tiny_model(), {"prune.method": "wanda", "prune.sparsity": 0.5})


def test_wanda_protects_weights_of_high_activation_features(calibration: torch.Tensor) -> None:
    """Amplify one input feature of layer 0's attention: Wanda keeps its column, magnitude
    (blind to activations) prunes it like any other."""
    feature = 5
    kept: dict[str, float] = {}
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for method in ("magnitude", "wanda"):
        model = tiny_model()
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight[feature] = 20.0
        recipe = {"prune.method": method, "prune.sparsity": 0.5}
        result = apply_pruning(model, recipe, calibration)
        column = result.masks["model.layers.0.self_attn.q_proj.weight"][:, feature]
        kept[method] = column.float().mean().item()
        masks[method] = result.masks
    assert kept["wanda"] >= 0.9
    assert kept["magnitude"] <= 0.75
    assert any(not torch.equal(masks["wanda"][k], masks["magnitude"][k]) for k in masks["wanda"])


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ({"prune.method": "sparsegpt"}, "sparsegpt"),
        ({"prune.method": "magnitude", "prune.pattern": "1:3"}, "1:3"),
        ({"prune.method": "magnitude", "prune.sparsity": 1.5}, "prune.sparsity"),
        ({"prune.method": "structured_mlp", "prune.sparsity": "half"}, "prune.sparsity"),
    ],
)
def test_invalid_prune_genes_are_rejected(recipe: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_pruning(tiny_model(), recipe)


def test_prune_none_changes_nothing() -> None:
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    result = apply_pruning(model, {"prune.method": "none"})
    assert result.masks == {} and result.sparsity == 0.0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


# ---------------------------------------------------------------------------- structured


def assert_reloads_identically(model: nn.Module, tmp_path: Path) -> nn.Module:
    ids = tokens(2, 12, seed=7)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), expected)
    generated = reloaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    return reloaded


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("use_calibration", [False, True])
def test_structured_mlp_prunes_saves_and_reloads(
    kv_heads: int, use_calibration: bool, calibration: torch.Tensor, tmp_path: Path
) -> None:
    model = tiny_model(kv_heads=kv_heads)
    dense = linear_numel(model)
    recipe = {"prune.method": "structured_mlp", "prune.sparsity": 0.25}
    result = apply_pruning(model, recipe, calibration if use_calibration else None)
    assert result.masks == {}
    assert model.config.intermediate_size == 96
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == 96
        assert layer.mlp.down_proj.in_features == 96
    removed = 2 * 3 * 64 * 32  # layers x (gate, up, down) x hidden x channels
    assert linear_numel(model) == dense - removed
    assert result.sparsity == pytest.approx(removed / dense)
    assert result.details["unit_sparsity"] == 0.25
    assert result.details["score"] == ("activation" if use_calibration else "weight_norm")
    json.dumps(result.details, allow_nan=False)
    reloaded = assert_reloads_identically(model, tmp_path)
    assert reloaded.config.intermediate_size == 96


def test_structured_mlp_removes_the_least_important_channels() -> None:
    model = tiny_model()
    weak = torch.arange(0, 128, 4)  # 32 channels made nearly silent in every layer
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, weak] *= 1e-3
    originals = [layer.mlp.up_proj.weight.detach().clone() for layer in model.model.layers]
    apply_pruning(model, {"prune.method": "structured_mlp", "prune.sparsity": 0.25})
    strong = torch.tensor([c for c in range(128) if c % 4])
    for layer, original in zip(model.model.layers, originals, strict=True):
        assert torch.equal(layer.mlp.up_proj.weight, original[strong])


@pytest.mark.parametrize(
    ("hidden", "kv_heads", "sparsity", "heads_after", "kv_after"),
    [(96, 4, 0.25, 3, 3), (96, 2, 0.5, 2, 1), (64, 4, 0.5, 2, 2)],
)
def test_structured_heads_prunes_saves_and_reloads(
    hidden: int,
    kv_heads: int,
    sparsity: float,
    heads_after: int,
    kv_after: int,
    calibration: torch.Tensor,
    tmp_path: Path,
) -> None:
    model = tiny_model(hidden=hidden, kv_heads=kv_heads)
    head_dim = hidden // 4
    dense = linear_numel(model)
    recipe = {"prune.method": "structured_heads", "prune.sparsity": sparsity}
    result = apply_pruning(model, recipe, calibration)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (
        heads_after,
        kv_after,
    )
    assert model.config.head_dim == head_dim
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.out_features == attn.o_proj.in_features == heads_after * head_dim
        assert attn.k_proj.out_features == attn.v_proj.out_features == kv_after * head_dim
        assert attn.num_key_value_groups == 4 // kv_heads
    removed = 2 * (4 - heads_after) * head_dim * hidden * 2  # q + o per head
    removed += 2 * (kv_heads - kv_after) * head_dim * hidden * 2  # k + v per KV head
    assert dense - linear_numel(model) == removed
    assert result.sparsity == pytest.approx(removed / dense)
    assert "adjusted" not in result.details
    reloaded = assert_reloads_identically(model, tmp_path)
    assert reloaded.config.num_attention_heads == heads_after


def test_structured_heads_removes_the_least_important_group() -> None:
    model = tiny_model(kv_heads=2)  # groups of 2 query heads, head_dim 16
    weak = slice(32, 64)  # the o_proj input columns of group 1
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, weak] *= 1e-3
    q_before = [layer.self_attn.q_proj.weight.detach().clone() for layer in model.model.layers]
    apply_pruning(model, {"prune.method": "structured_heads", "prune.sparsity": 0.5})
    for layer, original in zip(model.model.layers, q_before, strict=True):
        assert torch.equal(layer.self_attn.q_proj.weight, original[:32])


def test_structured_heads_adjusts_to_counts_the_config_accepts(tmp_path: Path) -> None:
    # LlamaConfig requires hidden_size % num_attention_heads == 0: 3 heads of 64 is rejected.
    model = tiny_model(hidden=64)
    result = apply_pruning(model, {"prune.method": "structured_heads", "prune.sparsity": 0.25})
    assert result.details["requested_units_removed"] == 1
    assert result.details["units_removed"] == 0
    assert "rejects 3 heads" in result.details["adjusted"]
    # Removing every group is never allowed: one is kept.
    model = tiny_model(hidden=64)
    result = apply_pruning(model, {"prune.method": "structured_heads", "prune.sparsity": 0.9})
    assert model.config.num_attention_heads == 1
    assert "at least one KV group" in result.details["adjusted"]
    assert_reloads_identically(model, tmp_path)


# ---------------------------------------------------------------------------- recovery


def pruned(method: str = "magnitude", seed: int = 0) -> tuple[nn.Module, PruneResult]:
    model = tiny_model(seed=seed)
    return model, apply_pruning(model, {"prune.method": method, "prune.sparsity": 0.5})


LORA = {"recovery.method": "lora", "recovery.lora_rank": 8, "recovery.steps": 40}


def test_lora_recovers_merges_and_keeps_the_masks() -> None:
    batch = memorisation_batch()
    model, pruning = pruned()
    before_loss = lm_loss(model, batch)
    result = apply_recovery(model, LORA, [batch], masks=pruning.masks, lr=1e-2)
    assert type(result.model) is LlamaForCausalLM
    assert not any("lora" in name for name, _ in result.model.named_modules())
    assert all(p.requires_grad for p in result.model.parameters())
    assert result.steps == 40
    after_loss = lm_loss(result.model, batch)
    assert after_loss < 0.9 * before_loss
    assert result.details["loss_after_merge"] == pytest.approx(after_loss)
    assert result.loss_last < result.loss_first
    assert measure_sparsity(result.model) == pytest.approx(pruning.sparsity)
    assert_masks_hold(result.model, pruning)
    assert result.cpu_seconds > 0 and result.wall_seconds > 0
    json.dumps(result.details, allow_nan=False)

    # Without the masks the merge writes dense B @ A into the pruned weights.
    model, pruning = pruned()
    unmasked = apply_recovery(model, LORA, [batch], masks=None, lr=1e-2)
    assert measure_sparsity(unmasked.model) < 0.5 * pruning.sparsity


def test_reapply_masks_zeroes_what_training_moved() -> None:
    model, pruning = pruned()
    with torch.no_grad():
        for linear in decoder_linears(model).values():
            linear.weight.add_(0.01)
    assert measure_sparsity(model) == 0.0
    reapply_masks(model, pruning.masks)
    assert measure_sparsity(model) == pytest.approx(pruning.sparsity)


def test_recovery_is_deterministic_for_a_seed() -> None:
    batches = [memorisation_batch(2), memorisation_batch(3)]
    recipe = {**LORA, "recovery.steps": 10}
    states = []
    for seed in (0, 0, 1):
        model, pruning = pruned()
        result = apply_recovery(model, recipe, batches, masks=pruning.masks, seed=seed)
        states.append(result.model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def kl_to_teacher(
    student: nn.Module, teacher: nn.Module, batch: dict[str, Any], t: float
) -> float:
    s, tt = logits(student, batch["input_ids"]), logits(teacher, batch["input_ids"])
    positions = torch.zeros_like(batch["labels"], dtype=torch.bool)
    positions[:, :-1] = batch["labels"][:, 1:] != -100
    return float(distillation_loss(s, tt, positions, t))


def test_distillation_reduces_kl_and_keeps_the_masks() -> None:
    teacher = tiny_model()
    model, pruning = pruned()
    batches = [memorisation_batch(2), memorisation_batch(3)]
    recipe = {"recovery.method": "distill", "recovery.steps": 30, "recovery.temperature": 2.0}
    kl_before = kl_to_teacher(model, teacher, batches[0], 2.0)
    teacher_state = copy.deepcopy(teacher.state_dict())
    result = apply_recovery(model, recipe, batches, masks=pruning.masks, teacher=teacher, lr=1e-3)
    assert result.model is model
    assert kl_to_teacher(model, teacher, batches[0], 2.0) < 0.7 * kl_before
    assert result.loss_last < result.loss_first
    assert measure_sparsity(model) == pytest.approx(pruning.sparsity)
    assert_masks_hold(model, pruning)
    # The teacher is untouched and the student's trainability flags are restored.
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert result.details["temperature"] == 2.0
    json.dumps(result.details, allow_nan=False)

    # Determinism: the same seed on the same start gives the same weights.
    again, pruning = pruned()
    apply_recovery(again, recipe, batches, masks=pruning.masks, teacher=teacher, lr=1e-3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_distillation_needs_a_teacher() -> None:
    model, _ = pruned()
    with pytest.raises(ValueError, match="teacher"):
        apply_recovery(model, {"recovery.method": "distill"}, [memorisation_batch()])


def test_qlora_trains_adapters_on_an_nf4_base(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    model, _ = pruned()
    model.save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu"
    )
    assert isinstance(base.model.layers[0].mlp.up_proj, Linear4bit)
    sparsity_nf4 = measure_sparsity(base)
    assert sparsity_nf4 >= 0.5  # nf4 has an exact zero: the pruned weights stay zero
    batch = memorisation_batch()
    before = lm_loss(base, batch)
    recipe = {"recovery.method": "qlora", "recovery.lora_rank": 4, "recovery.steps": 20}
    result = apply_recovery(base, recipe, [batch], lr=1e-2)
    assert isinstance(result.model, PeftModel)
    linears = decoder_linears(result.model)
    assert len(linears) == 14 and all(isinstance(m, Linear4bit) for m in linears.values())
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(torch.count_nonzero(p) > 0 for p in lora_b)
    assert lm_loss(result.model, batch) < before
    assert measure_sparsity(result.model) == sparsity_nf4  # the base is frozen
    assert result.details["merged"] is False

    with pytest.raises(ValueError, match="Linear4bit"):
        apply_recovery(tiny_model(), recipe, [batch])


def test_qlora_matches_lora_on_the_dequantized_weights(tmp_path: Path) -> None:
    """QLoRA's gradients go through the frozen 4-bit matmuls: its loss curve must match LoRA
    on a float model holding the dequantized weights. On CPUs with AVX512-BF16 an eval forward
    makes bitsandbytes re-pack the weights into a layout without a backward pass; recovery
    must undo that first."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model = tiny_model()
    model.save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, device_map="cpu"
    )
    batch = memorisation_batch()
    lm_loss(base, batch)  # an eval forward without grad (re-packs on AVX512-BF16 CPUs)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, linear in decoder_linears(base).items():
            reference.get_submodule(name).weight.copy_(dequantized_weight(linear))
    # The packed CPU inference kernel computes with bf16 scales: close, not bit-equal.
    assert lm_loss(reference, batch) == pytest.approx(lm_loss(base, batch), abs=1e-3)
    recipe = {"recovery.lora_rank": 4, "recovery.steps": 8}
    q = apply_recovery(base, {**recipe, "recovery.method": "qlora"}, [batch], lr=1e-2)
    f = apply_recovery(reference, {**recipe, "recovery.method": "lora"}, [batch], lr=1e-2)
    q_curve = [loss for _, loss in q.details["loss_curve"]]
    f_curve = [loss for _, loss in f.details["loss_curve"]]
    assert q_curve == pytest.approx(f_curve, abs=1e-4)


def test_recovery_none_is_a_no_op() -> None:
    model = tiny_model()
    result = apply_recovery(model, {"recovery.method": "none"}, [])
    assert result.model is model and result.steps == 0
    assert math.isnan(result.loss_first) and math.isnan(result.loss_last)


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ({"recovery.method": "sft"}, "sft"),
        ({"recovery.method": "lora", "recovery.lora_rank": 0}, "recovery.lora_rank"),
        ({"recovery.method": "distill", "recovery.temperature": -1.0}, "temperature"),
    ],
)
def test_invalid_recovery_genes_are_rejected(recipe: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_recovery(tiny_model(), recipe, [memorisation_batch()])


def test_defaults_match_the_builtin_space() -> None:
    from evo_compress.genomes import SearchSpace

    genes = SearchSpace.builtin().genes
    assert genes["prune.sparsity"].default == DEFAULT_SPARSITY
    assert genes["recovery.lora_rank"].default == DEFAULT_LORA_RANK
    assert genes["recovery.steps"].default == DEFAULT_STEPS
    assert genes["recovery.temperature"].default == DEFAULT_TEMPERATURE


def test_structured_mlp_keeps_a_width_int4_kernels_can_use() -> None:
    model = tiny_model()
    recipe = {"prune.method": "structured_mlp", "prune.sparsity": 0.4}  # 128 -> 76.8 channels
    result = apply_pruning(model, recipe)
    assert model.config.intermediate_size % 32 == 0
    assert model.config.intermediate_size == 64  # nearest multiple of 32 to 77
    assert "adjusted" in result.details


def test_structured_mlp_keeps_a_width_the_recipes_group_size_divides() -> None:
    model = tiny_model()
    recipe = {
        "prune.method": "structured_mlp",
        "prune.sparsity": 0.3,
        "quant.method": "gptq",
        "quant.group_size": 64,
    }
    apply_pruning(model, recipe)
    assert model.config.intermediate_size == 64  # 128 x 0.7 = 89.6 -> nearest multiple of 64
