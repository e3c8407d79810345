"""The environments ``make vllm-env`` builds beside the project (``scripts/vllm_env.sh``), as
both back ends find them: the vLLM back end serves from ``.venv-vllm`` and quantizes with
``.venv-quant``; the transformers back end quantizes with ``.venv-quant`` too (gptq).

``EVO_COMPRESS_VLLM_ENV`` and ``EVO_COMPRESS_QUANT_ENV`` name other folders (empty: use none).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

from evo_compress.exceptions import ConfigError

SERVING_ENV = ".venv-vllm"
QUANT_ENV = ".venv-quant"
SERVING_ENV_VAR = "EVO_COMPRESS_VLLM_ENV"
QUANT_ENV_VAR = "EVO_COMPRESS_QUANT_ENV"
STAMP = ".installed"  # written last by scripts/vllm_env.sh: the environment is complete

# The llm-compressor job both back ends run with the quantization environment's Python. A
# standalone script (it imports nothing from evo_compress), so it is run, never imported:
# naming its file keeps the back ends from importing each other.
QUANTIZE_JOB = Path(__file__).resolve().parents[1] / "vllm" / "quantize_job.py"

# The versions a quantized model depends on (``Evaluator.packages``) in that environment.
QUANT_PACKAGES = ("llmcompressor", "compressed-tensors", "torch", "transformers")

_READ_VERSIONS = (
    "import importlib.metadata as m, json\n"
    "found = {{}}\n"
    "for name in {names!r}:\n"
    "    try:\n"
    "        found[name] = m.version(name)\n"
    "    except m.PackageNotFoundError:\n"
    "        found[name] = None\n"
    "print(json.dumps(found))\n"
)


def _roots() -> list[Path]:
    """Where ``make vllm-env`` may have put the environments: the working folder, then the
    source checkout this package runs from (an editable install)."""
    roots = [Path.cwd()]
    checkout = Path(__file__).resolve().parents[3]
    if (checkout / "pyproject.toml").is_file() and checkout not in roots:
        roots.append(checkout)
    return roots


def _complete(folder: Path) -> bool:
    return (folder / "bin" / "python").exists() and (folder / STAMP).exists()


def find_environment(name: str, variable: str) -> Path | None:
    """The complete environment ``name``, or None. ``variable`` set to a folder names it
    instead, and a folder that is not a complete environment is a ``ConfigError`` (a typo
    must not quietly fall back to another vLLM); set to the empty string, none is used."""
    named = os.environ.get(variable)
    if named is not None:
        if not named.strip():
            return None
        folder = Path(named).expanduser()
        if not _complete(folder):
            missing = "bin/python" if not (folder / "bin" / "python").exists() else STAMP
            raise ConfigError(
                f"`{variable}` names {folder}, which is not an environment `make vllm-env` "
                f"completed (no {missing}); fix the path, or unset it to use {name}"
            )
        return folder.resolve()
    for folder in (root / name for root in _roots()):
        if _complete(folder):
            return folder.resolve()
    return None


def default_python() -> str | None:
    """Python of ``.venv-quant`` (llm-compressor), where ``make vllm-env`` made it."""
    env = find_environment(QUANT_ENV, QUANT_ENV_VAR)
    return None if env is None else str(env / "bin" / "python")


def read_versions(
    python: Path | str, names: tuple[str, ...], timeout_s: float = 60.0
) -> dict[str, str | None] | None:
    """Each distribution's version installed for ``python`` (None: not installed), from
    package metadata; None when that Python cannot be run."""
    try:
        proc = subprocess.run(
            [str(python), "-c", _READ_VERSIONS.format(names=names)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in reversed(proc.stdout.splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict):
            return {str(k): None if v is None else str(v) for k, v in found.items()}
    return None


@functools.cache
def quantize_job_digest() -> str:
    """A digest of ``quantize_job.py``'s text: a changed job may give other weights for the
    same inputs, so checkpoints and cached results it built must not be served after it."""
    return hashlib.sha256(QUANTIZE_JOB.read_bytes()).hexdigest()[:16]


__all__ = [
    "QUANTIZE_JOB",
    "QUANT_ENV",
    "QUANT_ENV_VAR",
    "QUANT_PACKAGES",
    "SERVING_ENV",
    "SERVING_ENV_VAR",
    "default_python",
    "find_environment",
    "quantize_job_digest",
    "read_versions",
]
