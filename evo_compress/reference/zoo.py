"""The zoo: tiny random models of the architectures people compress, built offline.

Each is built from ``AutoConfig.for_model`` (no download) with the reference tokenizer, seeded
random weights and every dimension small, and cached under ``default_cache_dir()/zoo`` like the
reference model: built once in a temporary folder and renamed into place under a lock. Their
accuracy on any task is noise; they exist to prove that every compression method applies to,
and is measured on, each architecture's real module layout (fused ``qkv_proj`` in Phi-3,
experts in a mixture of experts, sliding windows in Mistral and Gemma).

``build_random_model`` makes one of any shape: ``SIZE_100M`` is the ~106M-parameter Llama
the memory estimate is checked on.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evo_compress.reference._cache import default_cache_dir
from evo_compress.reference.tokenizer import BOS, EOS, PAD, VOCAB, build_tokenizer

# Bump when a shape below changes: new folders are built.
ZOO_VERSION = 1

# Shared by every member: 2 blocks, hidden 128, 4 query heads over 2 key/value heads (GQA, so
# head pruning removes whole groups), head_dim 32. Group sizes 32..128 divide every width.
_COMMON: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}

# `model_type` (as AutoConfig knows it) and what differs from _COMMON.
ZOO: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3"},
    "mistral": {"model_type": "mistral", "sliding_window": 32},
    "gemma3": {
        "model_type": "gemma3_text",
        "sliding_window": 32,
        "query_pre_attn_scalar": 32,
    },
    # Fused qkv_proj and gate_up_proj; Phi-3 has no head_dim setting (hidden / heads).
    "phi3": {"model_type": "phi3", "head_dim": None},
    "mixtral": {
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
    },
}

# The ~106M-parameter Llama of the memory estimate's check (SmolLM-135M's block shape).
SIZE_100M: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def zoo_config(architecture: str) -> Any:
    """The transformers config of zoo member ``architecture`` (no weights)."""
    if architecture not in ZOO:
        raise KeyError(f"no zoo architecture `{architecture}`; known: {sorted(ZOO)}")
    return model_config({**_COMMON, **ZOO[architecture]})


def model_config(shape: Mapping[str, Any]) -> Any:
    """A config from ``shape`` (``model_type`` plus fields; None drops a field) with the
    reference tokenizer's vocabulary and special tokens."""
    from transformers import AutoConfig

    fields = {k: v for k, v in shape.items() if k != "model_type" and v is not None}
    return AutoConfig.for_model(
        shape["model_type"],
        vocab_size=len(VOCAB),
        pad_token_id=VOCAB[PAD],
        bos_token_id=VOCAB[BOS],
        eos_token_id=VOCAB[EOS],
        **fields,
    )


def build_random_model(folder: Path, config: Any, seed: int = 0) -> Path:
    """Write a random model of ``config`` (seeded) with the reference tokenizer to
    ``folder``: a standard checkpoint that ``from_pretrained`` loads."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=VOCAB[BOS], eos_token_id=VOCAB[EOS], pad_token_id=VOCAB[PAD]
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    build_tokenizer(model_max_length=int(config.max_position_embeddings)).save_pretrained(folder)
    return folder


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_model(name: str, config: Any, cache_dir: Path | None = None, seed: int = 0) -> Path:
    """The folder of random model ``name`` under the cache's ``zoo/``, built first when it is
    missing (a crash never leaves a half folder that looks complete)."""
    root = (cache_dir or default_cache_dir()) / "zoo"
    folder = root / f"{name}-v{ZOO_VERSION}"
    if _complete(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(folder):  # another process built it while we waited
            return folder
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}.tmp-"))
        os.chmod(tmp, 0o755)
        try:
            build_random_model(tmp, config, seed)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_zoo_model(architecture: str, cache_dir: Path | None = None) -> Path:
    """The folder of zoo member ``architecture`` (one of ``ZOO``), built once per cache."""
    return ensure_model(architecture, zoo_config(architecture), cache_dir)


def ensure_100m_model(cache_dir: Path | None = None) -> Path:
    """The folder of the ~106M-parameter random Llama (``SIZE_100M``), built once per cache."""
    return ensure_model("llama-106m", model_config(SIZE_100M), cache_dir)


__all__ = [
    "SIZE_100M",
    "ZOO",
    "ZOO_VERSION",
    "build_random_model",
    "ensure_100m_model",
    "ensure_model",
    "ensure_zoo_model",
    "model_config",
    "zoo_config",
]
