"""``evaluator.name: auto`` (the default): the synthetic landscape for a ``synthetic*`` model
id, the vLLM back end on a CUDA machine whose vLLM serve command can be found, the
transformers back end otherwise (CPU machines, or no vLLM installed).

Settings are per back end: ``{transformers: {...}, vllm: {...}, synthetic: {...}}``; the
chosen one gets its own section. The choice is made once, when the evaluator is built, and
the run records the chosen back end's name and fingerprint, so resuming on another kind of
machine is refused rather than silently mixing measurements.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Mapping
from typing import Any

from evo_compress.exceptions import ConfigError
from evo_compress.fitness._base import EvaluationContext, Evaluator

_SECTIONS = ("transformers", "vllm", "synthetic")


def choose_backend(settings: Mapping[str, Any], context: EvaluationContext) -> str:
    if context.model.id.startswith("synthetic"):
        return "synthetic"
    device = context.hardware.device
    if device == "cpu":
        return "transformers"
    from evo_compress.fitness.vllm.environment import default_command

    command = dict(settings.get("vllm") or {}).get("command") or default_command()
    program = shlex.split(command)[0] if isinstance(command, str) else next(iter(command))
    if shutil.which(program) is None:
        return "transformers"
    try:
        import torch

        return "vllm" if torch.cuda.is_available() else "transformers"
    except ImportError:
        return "transformers"


def make_auto_evaluator(settings: Mapping[str, Any], context: EvaluationContext) -> Evaluator:
    """A synthetic model: the synthetic landscape; else vLLM where it runs, else transformers."""
    from evo_compress.fitness._base import EVALUATORS

    unknown = sorted(set(settings) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"`evaluator.settings.{unknown[0]}`: the auto evaluator takes one section per "
            f"back end ({', '.join(_SECTIONS)}), got {unknown}"
        )
    name = choose_backend(settings, context)
    return EVALUATORS.get(name)(dict(settings.get(name) or {}), context)
