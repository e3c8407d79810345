"""Loading a causal LM and its task texts in a worker, and compressing its weights as a
recipe says: what the transformers pipeline and the vLLM checkpoint builder both do."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evo_compress.fitness.model.compress import CompressedModel, compress_weights

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_dtype(dtype: str, device: str) -> torch.dtype | str:
    """``model.dtype`` as loading resolves it: on CPU, half precision kernels are slow or
    missing, so "auto" means float32 there; on a GPU it means the checkpoint's dtype."""
    return _DTYPES.get(dtype, torch.float32 if device == "cpu" else "auto")


def load_model(path: str, dtype: str, device: str) -> Any:
    """The model of ``path`` in ``model.dtype``, in eval mode on ``device``. Transformers
    builds it on the meta device and fills it from the checkpoint (low CPU memory: no
    randomly initialised copy); on a GPU, ``device_map`` streams the weights straight to it,
    so no full copy ever sits in CPU memory."""
    kwargs: dict[str, Any] = {"dtype": load_dtype(dtype, device)}
    if device.startswith("cuda"):
        kwargs["device_map"] = {"": device}
    model: Any = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval()


def tokenize(tokenizer: Any, texts: list[str], device: str) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (padding masked out of the loss)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    labels = encoded["input_ids"].clone()
    labels[encoded["attention_mask"] == 0] = -100
    return {
        "input_ids": encoded["input_ids"].to(device),
        "attention_mask": encoded["attention_mask"].to(device),
        "labels": labels.to(device),
    }


def load_and_compress(
    payload: dict[str, Any], recipe: dict[str, Any]
) -> tuple[Any, CompressedModel]:
    """Load the model and tokenizer of ``payload`` and compress the model's weights as
    ``recipe`` says, with the task's texts for calibration and recovery."""
    settings = payload["settings"]
    device = payload["device"]
    tokenizer = AutoTokenizer.from_pretrained(payload["model_path"])
    model = load_model(payload["model_path"], payload["dtype"], device)
    texts: list[str] = list(payload["task"].get("train_texts") or [])
    calibration = None
    batches: list[dict[str, torch.Tensor]] = []
    if texts:
        # Both back ends resolve `calibration.samples` into the task's data (``task_data``);
        # a payload made without it falls back on the settings' shorthand.
        samples = payload["task"].get("calibration_samples") or settings["calibration_samples"]
        calibration = tokenize(tokenizer, texts[: int(samples)], device)["input_ids"]
        size = int(settings["recovery_batch_size"])
        batches = [
            tokenize(tokenizer, texts[i : i + size], device)
            for i in range(0, min(len(texts), 512), size)
        ]
    with tempfile.TemporaryDirectory(prefix="evo-compress-") as workdir:
        compressed = compress_weights(
            model,
            recipe,
            device=device,
            calibration=calibration,
            batches=batches,
            workdir=Path(workdir),
            recovery_lr=float(settings["recovery_lr"]),
            seed=int(settings["seed"]),
            watts_per_core=float(settings["watts_per_core"]),
            gradient_checkpointing=bool(settings.get("gradient_checkpointing", True)),
        )
    return tokenizer, compressed


__all__ = ["load_and_compress", "load_dtype", "load_model", "tokenize"]
