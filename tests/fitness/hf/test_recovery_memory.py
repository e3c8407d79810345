"""Recovery that fits real models: the distillation teacher as logits computed before
compression (no second model), gradient checkpointing, and ``model.dtype`` kept throughout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from evo_compress.fitness.model.compress import compress_weights  # noqa: E402
from evo_compress.fitness.model.load import load_model  # noqa: E402
from evo_compress.fitness.model.prune import apply_pruning, decoder_layers  # noqa: E402
from evo_compress.fitness.model.recover import (  # noqa: E402
    TeacherLogits,
    apply_recovery,
    distillation_loss,
    precompute_teacher_logits,
)
from evo_compress.testing import save_random_llama  # noqa: E402

VOCAB = 32
DISTILL = {"recovery.method": "distill", "recovery.steps": 12, "recovery.temperature": 2.0}


def tiny_model(seed: int = 0, dtype: Any = torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def kl(student: Any, teacher: Any, b: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        s = student(input_ids=b["input_ids"]).logits
        t = teacher(input_ids=b["input_ids"]).logits
    positions = torch.zeros_like(b["labels"], dtype=torch.bool)
    positions[:, :-1] = b["labels"][:, 1:] != -100
    return float(distillation_loss(s, t, positions, 2.0))


def pruned(dtype: Any = torch.float32) -> tuple[Any, Any]:
    model = tiny_model(dtype=dtype)
    return model, apply_pruning(model, {"prune.method": "magnitude", "prune.sparsity": 0.5})


def test_precomputed_logits_teach_exactly_what_the_teacher_model_does() -> None:
    batches = [batch(2), batch(3)]
    teacher = tiny_model()
    logits = precompute_teacher_logits(teacher, batches, 2)
    assert logits.indices is None and logits.values[0].shape == (4, 16, VOCAB)
    by_model, p1 = pruned()
    by_logits, p2 = pruned()
    apply_recovery(by_model, DISTILL, batches, masks=p1.masks, teacher=teacher)
    result = apply_recovery(by_logits, DISTILL, batches, masks=p2.masks, teacher=logits)
    for name, value in by_model.state_dict().items():
        torch.testing.assert_close(by_logits.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert result.details["teacher"]["kind"] == "logits precomputed before compression"


def test_top_k_logits_stand_in_for_a_large_vocabulary() -> None:
    batches = [batch(2), batch(3)]
    teacher = tiny_model()
    logits = precompute_teacher_logits(teacher, batches, 2, top_k=8)
    assert logits.indices is not None and logits.values[0].shape == (4, 16, 8)
    assert logits.nbytes == 2 * 4 * 16 * 8 * (4 + 4)  # float32 values, int32 indices
    assert float(logits.values[0].exp().sum(-1).max()) < 1.0  # a tail is left out
    student, pruning = pruned()
    before = kl(student, teacher, batches[0])
    result = apply_recovery(student, DISTILL, batches, masks=pruning.masks, teacher=logits)
    assert kl(student, teacher, batches[0]) < 0.8 * before
    assert result.details["teacher"]["top_k"] == 8


def test_teacher_logits_must_cover_the_batches_trained_on() -> None:
    batches = [batch(2), batch(3)]
    short = TeacherLogits([torch.zeros(4, 16, VOCAB)], None)
    student, _ = pruned()
    with pytest.raises(ValueError, match="cover 1 batches"):
        apply_recovery(student, DISTILL, batches, teacher=short)


def test_compression_distills_from_the_model_before_it_was_pruned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("distillation must not load a second model")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", never)
    model = tiny_model()
    reference = tiny_model()
    batches = [batch(2), batch(3)]
    recipe = {**DISTILL, "prune.method": "magnitude", "prune.sparsity": 0.5}
    out = compress_weights(
        model, recipe, device="cpu", calibration=None, batches=batches, workdir=tmp_path
    )
    teacher = out.details["recovery"]["teacher"]
    assert teacher["batches"] == 2 and teacher["bytes"] == 2 * 4 * 16 * VOCAB * 4
    # It learnt towards the unpruned model's outputs.
    restart, _ = pruned()
    assert kl(out.model, reference, batches[0]) < 0.8 * kl(restart, reference, batches[0])


def count_layer_calls(model: Any) -> list[int]:
    calls = [0]
    layer = decoder_layers(model)[0].mlp  # inside the checkpointed layer
    # A pre-hook: the recomputation stops early, before the MLP returns.
    layer.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_recomputes_and_changes_nothing_else() -> None:
    recipe = {"recovery.method": "lora", "recovery.lora_rank": 4, "recovery.steps": 3}
    weights = []
    for checkpointing in (False, True):
        model = tiny_model()
        calls = count_layer_calls(model)
        result = apply_recovery(
            model, recipe, [batch(2)], lr=1e-2, gradient_checkpointing=checkpointing
        )
        # A forward per step, recomputed in every backward pass with checkpointing, and
        # one after the merge (``loss_after_merge``).
        assert calls[0] == (3 + 3 if checkpointing else 3) + 1
        assert result.details["gradient_checkpointing"] is checkpointing
        assert not any(m.gradient_checkpointing for m in decoder_layers(result.model))
        weights.append(result.model.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6)


def test_model_dtype_is_honoured_in_loading_and_recovery(tmp_path: Path) -> None:
    folder = save_random_llama(tmp_path / "m", hidden_size=64, num_hidden_layers=2)
    assert {p.dtype for p in load_model(str(folder), "auto", "cpu").parameters()} == {
        torch.float32
    }
    model = load_model(str(folder), "bfloat16", "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    lora = apply_recovery(
        tiny_model(dtype=torch.bfloat16),
        {"recovery.method": "lora", "recovery.lora_rank": 4, "recovery.steps": 2},
        [batch(2)],
    )
    assert {p.dtype for p in lora.model.parameters()} == {torch.bfloat16}
    teacher = tiny_model(dtype=torch.bfloat16)
    logits = precompute_teacher_logits(teacher, [batch(2)], 1)
    assert logits.values[0].dtype == torch.bfloat16
    student, pruning = pruned(torch.bfloat16)
    out = apply_recovery(
        student, {**DISTILL, "recovery.steps": 2}, [batch(2)], masks=pruning.masks, teacher=logits
    )
    assert {p.dtype for p in out.model.parameters()} == {torch.bfloat16}
