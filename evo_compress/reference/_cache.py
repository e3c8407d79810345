"""Where evo-compress keeps generated artefacts (reference model, task files, HF caches)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EVO_COMPRESS_CACHE"


def _repo_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "evo_compress").is_dir():
            return folder
    return None


def default_cache_dir() -> Path:
    """``$EVO_COMPRESS_CACHE`` if set, else ``<repo>/.cache/evo-compress`` when evo-compress
    runs from a checkout (the folder is git-ignored), else ``<cwd>/.cache/evo-compress``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    root = _repo_root(Path(__file__).resolve().parent) or _repo_root(Path.cwd().resolve())
    return (root or Path.cwd().resolve()) / ".cache" / "evo-compress"


def hf_cache_env(cache_dir: Path) -> dict[str, str]:
    """Hugging Face cache variables pointing inside ``cache_dir`` (nothing under ~/.cache)."""
    hf_home = cache_dir / "huggingface"
    return {
        "HF_HOME": str(hf_home),
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
    }


def set_hf_cache_env(cache_dir: Path) -> None:
    """Point the Hugging Face caches inside ``cache_dir`` unless the user already chose."""
    for key, value in hf_cache_env(cache_dir).items():
        os.environ.setdefault(key, value)
